"""What ``/openapi.json`` (and so ``/docs``) says beyond what FastAPI derives from the routes:
the error responses every operation shares, the ``X-Deadline-Ms`` header, and errors in the
service's own ``{"error": {...}}`` shape instead of FastAPI's ``{"detail": [...]}``."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.api.deps import DEADLINE_HEADER, MILLISECONDS
from service.api.schemas import TEXT_MARK, BatchRequest, ErrorResponse
from service.config import Settings

# What every POST endpoint may answer besides its own codes.
COMMON_ERRORS = {
    400: "Invalid JSON (`invalid_json`: not JSON, not UTF-8) or header (`invalid_header`).",
    404: "The model is not loaded / unknown model.",
    408: "The body did not fully arrive within NLPSERVE_BODY_TIMEOUT_S (`body_timeout`).",
    413: "Body over NLPSERVE_MAX_BODY_BYTES.",
    415: "A Content-Encoding (compressed body) this server does not read.",
    429: "The model's queue is full: retry after `Retry-After` seconds.",
    503: "Starting, shutting down, or the queue backend is unreachable.",
    504: f"Not served before the deadline (`{DEADLINE_HEADER}`).",
}

# Declared for the docs only (Swagger's "Try it out" can send it); the routes read it through
# service.api.deps.deadline_from, which answers 400 for a bad value.
DEADLINE_PARAMETER: dict[str, Any] = {
    "parameters": [
        {
            "name": DEADLINE_HEADER,
            "in": "header",
            "required": False,
            "description": "Milliseconds this request may take before a 504 (capped by "
            "NLPSERVE_DEFAULT_DEADLINE_MS, the default): a positive number in digits, with "
            "an optional fraction.",
            # a string of digits: a JSON Schema number also allows "1e3" or "1.5e+308",
            # which the header refuses (400 invalid_header)
            "schema": {
                "type": "string",
                # the lookahead: not all zeros ("0" and "0.0" are not positive)
                "pattern": f"^(?=[0-9.]*[1-9]){MILLISECONDS.pattern}$",
                "examples": ["2000", "2.5"],
            },
        }
    ]
}


def error_responses(own: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """``responses=`` of a route: the common errors plus ``own`` (which wins on a code)."""
    return {
        status: {"model": ErrorResponse, "description": text}
        for status, text in sorted({**COMMON_ERRORS, **own}.items())
    }


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


def _apply_limits(schemas: dict[str, Any], settings: Settings) -> None:
    """The limits this server enforces (its settings), not only the static models' bounds:
    a schema that let 10,000 items or a 1,000,000-character text pass announced requests
    that could only get a 422."""
    _mark_text_limit(schemas, settings.max_text_chars)
    for cls in BatchRequest.__subclasses__():
        inputs = schemas.get(cls.__name__, {}).get("properties", {}).get("inputs")
        if inputs is not None:
            inputs["maxItems"] = settings.max_batch_items  # at most MAX_LIST_ITEMS (config)
    explain = schemas.get("ExplainRequest", {}).get("properties", {}).get("max_evals", {})
    for choice in explain.get("anyOf", []):
        if choice.get("type") == "integer":
            choice["maximum"] = settings.explain_max_evals_limit


def install_openapi(app: FastAPI) -> None:
    """Every 422 is this service's ErrorResponse (its validation handler answers so)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            ours = {"$ref": "#/components/schemas/ErrorResponse"}
            for path in schema.get("paths", {}).values():
                for op in path.values():
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
            _apply_limits(
                schema.get("components", {}).get("schemas", {}), app.state.service.settings
            )
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

"""Pure ASGI middleware (no BaseHTTPMiddleware: it buffers and breaks disconnect detection)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from urllib.parse import parse_qs

from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import tracecontext
from service.api.errors import LIMIT_BODY_BYTES, Limit, error_body, error_response, is_v2
from service.ids import new_id
from service.metrics import Metrics


class BodyTooLarge(HTTPException):
    """Raised from ``receive``: an HTTPException so FastAPI's body reader re-raises it (it
    turns any other error while reading into a 400) and the error handlers answer 413."""

    code = "body_too_large"

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, _too_large_message(max_bytes))
        self.limit = Limit(LIMIT_BODY_BYTES, max_bytes)


def _too_large_message(max_bytes: int) -> str:
    return f"the request body exceeds {max_bytes} bytes (NLPSERVE_MAX_BODY_BYTES)"


class BodyTimeout(HTTPException):
    """Raised from ``receive`` when the rest of the body does not arrive in time; answered
    408 like :class:`BodyTooLarge`, and ``Connection: close`` ends the connection (its
    unread rest of a body could not be told from a next request)."""

    code = "body_timeout"

    def __init__(self, timeout_s: float) -> None:
        super().__init__(408, _timeout_message(timeout_s), headers={"Connection": "close"})


class BodyNotUtf8Json(HTTPException):
    """Raised from ``receive`` for a body holding a NUL byte: never in UTF-8 JSON, always in
    UTF-16/32 JSON (which ``json.loads`` would otherwise take from bytes)."""

    code = "invalid_json"

    def __init__(self) -> None:
        super().__init__(
            400,
            "the body is not valid JSON: it holds a NUL byte (send UTF-8 JSON; a NUL in a "
            "string is written \\u0000)",
        )


def _timeout_message(timeout_s: float) -> str:
    return (
        f"waited {timeout_s:g} s for the rest of the request body (NLPSERVE_BODY_TIMEOUT_S); "
        "send the whole body at once, with a correct Content-Length"
    )


def _json_error(
    status: int,
    code: str,
    message: str,
    extra: list[tuple[bytes, bytes]] | None = None,
    v2: bool = False,
    limit: Limit | None = None,
) -> tuple[dict, bytes]:
    body = json.dumps(error_body(code, message, v2, limit)).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *(extra or []),
        ],
    }
    return start, body


class _StartTracker:
    """``send`` for an inner app that remembers whether the response has started (after
    that, an error can no longer be answered with a response of its own)."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.started = False

    async def __call__(self, msg: Message) -> None:
        if msg["type"] == "http.response.start":
            self.started = True
        await self.send(msg)


async def _send_error(
    scope: Scope,
    send: Send,
    status: int,
    code: str,
    message: str,
    extra: list[tuple[bytes, bytes]] | None = None,
    limit: Limit | None = None,
) -> None:
    scope.setdefault("state", {})["error_code"] = code  # the metrics middleware counts it
    start, body = _json_error(status, code, message, extra, is_v2(scope["path"]), limit)
    await send(start)
    await send({"type": "http.response.body", "body": body})


class JsonBodyMiddleware:
    """Read every POST body to the API as JSON, whatever Content-Type it declares.

    ``curl -d '{...}'`` sends ``application/x-www-form-urlencoded``; FastAPI would then not
    parse the body and answer a puzzling type error. The API takes only JSON, so the body is
    parsed as JSON, and a body that is not JSON gets the usual 400 ``invalid_json``.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST":
            headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
            ctype = dict(scope.get("headers") or []).get(b"content-type", b"")
            if b"json" not in ctype.lower():
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """What a request body may be, checked as it arrives. 413 for bodies over ``max_bytes``:
    by Content-Length before reading anything, and by counting for chunked bodies that do
    not declare a length. 408 for a body that has not fully arrived ``timeout_s`` after the
    request's headers (uvicorn itself would wait for it forever; a request's deadline only
    starts once its body is read). 415 for a POST with a Content-Encoding (nothing here
    decompresses), 400 for a body that cannot be UTF-8 JSON (a NUL byte).

    Outermost of what reads bodies: the prediction fast path and FastAPI read through it.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, send, BodyTooLarge(self.max_bytes))
            return
        if scope.get("method") == "POST":
            # every Content-Encoding line counts (the dict above keeps only the last one)
            codings = b",".join(v for k, v in scope["headers"] if k == b"content-encoding")
            if any(c.strip() not in (b"", b"identity") for c in codings.lower().split(b",")):
                await _send_error(
                    scope,
                    send,
                    415,
                    "unsupported_media_type",
                    f"Content-Encoding {codings.decode('latin-1').strip()!r} is not "
                    "supported: send the JSON body uncompressed, without the header (a charset "
                    "belongs in Content-Type)",
                )
                return
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        seen = 0
        body_done = False  # after the body, receive() waits for a disconnect: no timeout

        async def limited_receive() -> Message:
            nonlocal seen, body_done
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    msg = await receive()
            except TimeoutError:
                raise BodyTimeout(self.timeout_s) from None
            if msg["type"] == "http.request":
                chunk = msg.get("body", b"")
                seen += len(chunk)
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
                if b"\x00" in chunk:
                    raise BodyNotUtf8Json
                body_done = not msg.get("more_body", False)
            else:  # http.disconnect
                body_done = True
            return msg

        tracked = _StartTracker(send)
        try:
            await self.app(scope, limited_receive, tracked)
        except (BodyTooLarge, BodyTimeout, BodyNotUtf8Json) as exc:  # no handler answered
            if not tracked.started:
                await self._reject(scope, send, exc)

    async def _reject(
        self, scope: Scope, send: Send, exc: BodyTooLarge | BodyTimeout | BodyNotUtf8Json
    ) -> None:
        limit = exc.limit if isinstance(exc, BodyTooLarge) else None
        await _send_error(scope, send, exc.status_code, exc.code, exc.detail, limit=limit)


class MetricsMiddleware:
    """Counts and times prediction requests by model, status and priority class, and
    rejections by reason.

    ``model_for(path, query)`` names the model a request is for (None: not a prediction
    endpoint, not counted). A route that resolved the model sets ``request.state.model``.
    ``priority_for(scope)``: the request's priority class (``interactive`` or ``batch``).
    """

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        model_for: Callable[[str, dict[str, list[str]]], tuple[str, str] | None],
        priority_for: Callable[[Scope], str],
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.model_for = model_for
        self.priority_for = priority_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        target = self.model_for(scope["path"], query)
        if target is None:
            await self.app(scope, receive, send)
            return
        model, endpoint = target
        state = scope.setdefault("state", {})
        status = 500
        t0 = time.perf_counter()

        async def capturing_send(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, capturing_send)
        finally:
            model = state.get("model", model)
            trace = state.get("trace")  # RequestIdMiddleware's, outside this one
            self.metrics.observe_request(
                model,
                endpoint,
                status,
                time.perf_counter() - t0,
                trace.trace_id if trace is not None and trace.sampled else None,
                priority=self.priority_for(scope),
            )
            if status >= 400:
                reason = state.get("error_code") or f"http_{status}"
                self.metrics.child(self.metrics.rejected, model, reason).inc()


# What a caller's (or the gateway's) request id may look like; anything else is replaced,
# so a header cannot smuggle control characters or megabytes into logs and responses.
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


class RequestIdMiddleware:
    """Every response carries ``X-Request-ID``: the caller's (the gateway forwards or mints
    one) when it is well-formed, else a new one. Routes and error handlers find it in
    ``request.state.request_id`` for their logs.

    And ``traceparent`` (W3C Trace Context, service/tracecontext.py): the caller's trace, or a
    new one, with this request's own span id; ``tracestate`` back as it came, where kept. The
    context is ``scope["state"]["trace"]`` (the metrics' exemplar) and, while the request is
    served, ``tracecontext.CURRENT`` (its log lines and work items)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = scope.get("headers") or []
        headers = dict(raw)
        given = headers.get(b"x-request-id", b"")
        rid = given if _REQUEST_ID.fullmatch(given) else new_id().encode()
        state = scope.setdefault("state", {})
        state["request_id"] = rid.decode()
        if b"traceparent" in headers:  # every line: a repeated header is invalid
            trace = tracecontext.from_headers(
                [v for k, v in raw if k == b"traceparent"],
                [v for k, v in raw if k == b"tracestate"],
            )
        else:
            trace = tracecontext.from_headers([], [])
        state["trace"] = trace
        added = [(b"x-request-id", rid), (b"traceparent", trace.traceparent.encode())]
        if trace.tracestate is not None:
            added.append((b"tracestate", trace.tracestate.encode()))

        async def tagging_send(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                headers = [(k, v) for k, v in msg.get("headers", []) if k not in _TAGGED]
                msg = {**msg, "headers": [*headers, *added]}
            await send(msg)

        token = tracecontext.CURRENT.set(trace)
        try:
            await self.app(scope, receive, tagging_send)
        finally:
            tracecontext.CURRENT.reset(token)


_TAGGED = frozenset((b"x-request-id", b"traceparent", b"tracestate"))


class ShutdownMiddleware:
    """503 ``backend_unavailable`` for a request that the server cancels at the end of its
    graceful shutdown, instead of uvicorn's plain-text 500.

    The queue's drain answers every request waiting on it before that (service/server.py);
    this covers the others, e.g. one whose body is still arriving. ``stopping()`` tells a
    shutdown's cancellation from any other (a client gone is handled by the routes).
    """

    def __init__(self, app: ASGIApp, stopping: Callable[[], bool]) -> None:
        self.app = app
        self.stopping = stopping

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tracked = _StartTracker(send)
        try:
            await self.app(scope, receive, tracked)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if tracked.started or not self.stopping() or task is None:
                raise
            task.uncancel()  # answered here: the task ends normally, nothing to log
            await _send_error(
                scope,
                send,
                503,
                "backend_unavailable",
                "the service is shutting down",
                [(b"retry-after", b"1")],
            )


# What a browser page may send and read. Server-Timing, X-Request-ID, Retry-After and the
# trace context are not CORS-safelisted response headers: unexposed, the page's code could
# not read them. A page traced in the browser (OpenTelemetry's fetch instrumentation) sends
# traceparent and tracestate; Authorization and X-API-Key carry the API key where
# NLPSERVE_API_KEYS_FILE is set.
CORS_ALLOW_HEADERS = (
    "Content-Type",
    "X-Request-ID",
    "X-Deadline-Ms",
    "X-Priority",
    "traceparent",
    "tracestate",
    "Authorization",
    "X-API-Key",
)
CORS_EXPOSE_HEADERS = ("X-Request-ID", "Server-Timing", "Retry-After", "traceparent", "tracestate")


class CorsMiddleware(CORSMiddleware):
    """Starlette's CORS for ``NLPSERVE_CORS_ALLOW_ORIGINS``, with a refused preflight
    answered in the API's error format (Starlette answers it in plain text)."""

    def __init__(self, app: ASGIApp, origins: list[str]) -> None:
        super().__init__(
            app,
            allow_origins=origins,
            allow_methods=("GET", "POST"),
            allow_headers=CORS_ALLOW_HEADERS,
            expose_headers=CORS_EXPOSE_HEADERS,
            max_age=600,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "OPTIONS":
            headers = Headers(scope=scope)
            if "origin" in headers and "access-control-request-method" in headers:
                # Starlette's preflight_response is not told the path: a refusal under /v2
                # must be in that protocol's error shape
                response = self._preflight(headers, is_v2(scope["path"]))
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def _preflight(self, request_headers: Headers, v2: bool) -> Response:
        response = self.preflight_response(request_headers)
        if response.status_code != 400:
            return response
        refused = bytes(response.body).decode().removeprefix("Disallowed CORS ")
        message = (
            f"CORS preflight refused ({refused}): allowed origins are those in "
            "NLPSERVE_CORS_ALLOW_ORIGINS, methods GET and POST, request headers "
            f"{', '.join(CORS_ALLOW_HEADERS)}"
        )
        headers = {k: v for k, v in response.headers.items() if k != "content-length"}
        headers.pop("content-type", None)
        return error_response(400, "cors_preflight_refused", message, headers, v2)

"""The prediction endpoints' hot path, below FastAPI's router.

On a 2-core CPU the event loop's own work is what separates served throughput from raw ONNX
Runtime's, and FastAPI's exception middleware, router, dependency solver and request handler
are a large part of it (bench/README.md, "CPU results: the prediction fast path"). A well-formed
``POST /v1/<task>`` (a JSON body that the route's own body type accepts, no query parameter
but ``model``) is answered here by the route's own :func:`predict` and, when that raises,
by the app's own exception handlers.

Other paths and methods go straight down the FastAPI stack; a prediction request with other
query parameters, or a body that is not valid JSON or fails validation, goes down it too,
with its body replayed: each of those errors is FastAPI's and the routes' own, not a copy.
Only a batch over the item limit is refused here before validation, as the route would.
``NLPSERVE_FAST_PATH=false`` sends every request through FastAPI.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from pydantic import TypeAdapter
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import batch_len, client_closed, too_many_items
from service.api.routes.predict import BODIES, predict

Handler = Callable[[Request, Exception], Awaitable[Response]]


def _model_param(query_string: bytes) -> tuple[str | None, bool]:
    """(the ``model`` query parameter, whether the fast path may take the request): no
    query, or exactly one ``model=...``; anything else is FastAPI's to interpret."""
    if not query_string:
        return None, True
    pairs = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
    if len(pairs) == 1 and pairs[0][0] == "model":
        return pairs[0][1], True
    return None, False


_UNREAD = object()  # the body was not parsed here


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` for the FastAPI stack after the body was read here: the body first, then
    the connection's own messages (a disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


class PredictFastPath:
    """ASGI middleware: ``api`` is the FastAPI app whose routes and handlers it stands for."""

    def __init__(self, app: ASGIApp, api: FastAPI) -> None:
        self.app = app
        self.api = api
        self.routes: dict[str, tuple[str, TypeAdapter[Any]]] = {
            f"/v1/{task}": (task, TypeAdapter(body)) for task, body in BODIES.items()
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = None
        if scope["type"] == "http" and scope["method"] == "POST":
            route = self.routes.get(scope["path"])
        if route is None:
            await self.app(scope, receive, send)
            return
        task, adapter = route
        model, plain_query = _model_param(scope.get("query_string", b""))
        request = Request(scope, receive)
        try:
            body = await request.body()
        except HTTPException as exc:  # 413 from the body limit, answered like FastAPI's
            response = await self._error_response(request, exc)
        except ClientDisconnect:  # gone mid-body: counted as such, not as a bad request
            response = await self._error_response(request, client_closed())
        except Exception:  # what FastAPI answers when reading fails
            error = HTTPException(400, "There was an error parsing the body")
            response = await self._error_response(request, error)
        else:
            doc: Any = _UNREAD
            parsed = None
            if plain_query:
                with contextlib.suppress(Exception):  # bad JSON (or UTF-8, or nesting)
                    doc = json.loads(body)
            limit = self.api.state.service.settings.max_batch_items
            if (n := batch_len(doc)) > limit:
                # Refused before each item is validated (twice, with FastAPI's replay): a
                # 1 MB body of 150,000 bad items held the event loop for ~1 s.
                refusal = await self._error_response(request, too_many_items(n, limit))
                await refusal(scope, receive, send)
                return
            if doc is not _UNREAD:
                with contextlib.suppress(Exception):  # bad fields
                    parsed = adapter.validate_python(doc)
            if parsed is None:  # FastAPI answers: its own validation errors, or its routing
                await self.app(scope, _replay(body, receive), send)
                return
            try:
                response = await predict(request, task, parsed, model)
            except Exception as exc:
                response = await self._error_response(request, exc)
        await response(scope, receive, send)

    async def _error_response(self, request: Request, exc: Exception) -> Response:
        handler = self._handler_for(exc)
        if handler is None:
            raise exc  # a bug: the server error middleware answers 500, as for a route
        return await handler(request, exc)

    def _handler_for(self, exc: Exception) -> Handler | None:
        """The handler Starlette's exception middleware would pick: the first class of the
        exception's MRO with one, ``Exception`` excluded (that one is the 500 handler of
        the outermost middleware)."""
        for cls in type(exc).__mro__:
            if cls is Exception:
                return None
            handler = self.api.exception_handlers.get(cls)
            if handler is not None:
                return handler  # type: ignore[return-value]
        return None

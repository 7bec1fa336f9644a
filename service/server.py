"""Run the API under uvicorn with a graceful shutdown."""

from __future__ import annotations

import json
import socket
from typing import Any

import uvicorn
from fastapi import FastAPI

from service.api.app import begin_shutdown, create_app
from service.api.deps import ServiceState
from service.config import Settings

try:
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
except ImportError:  # httptools is a dependency; without it uvicorn's h11 answers as before
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

# A request uvicorn's parser cannot read (a control character or space in the URL, a bad or
# doubled Content-Length, a broken chunk) never reaches the app; uvicorn answered it with a
# plain-text 400. This is the service's error shape for it.
BAD_HTTP_BODY = json.dumps(
    {
        "error": {
            "code": "bad_request",
            "message": "the request is not valid HTTP/1.1 (its request line, headers or "
            "framing could not be parsed); the connection is closed",
        }
    }
).encode()


if HttpToolsProtocol is not None:

    class HttpProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol, answering an unparseable request in JSON."""

        def send_400_response(self, msg: str) -> None:
            content = [STATUS_LINE[400]]
            for name, value in self.server_state.default_headers:
                content.extend([name, b": ", value, b"\r\n"])
            content.extend(
                [
                    b"content-type: application/json\r\n",
                    b"content-length: " + str(len(BAD_HTTP_BODY)).encode("ascii") + b"\r\n",
                    b"connection: close\r\n",
                    b"\r\n",
                    BAD_HTTP_BODY,
                ]
            )
            self.transport.write(b"".join(content))
            self.transport.close()

    HTTP: Any = HttpProtocol
else:
    HTTP = "auto"


def drain_deadline_s(graceful_s: float) -> float:
    """How long the queue may drain on SIGTERM: a little less than uvicorn's graceful
    timeout, so the queue fails its leftovers (503) and their responses are written before
    uvicorn cancels the request tasks (which would answer a plain-text 500)."""
    return max(0.0, graceful_s - min(1.0, graceful_s / 4))


class Server(uvicorn.Server):
    """uvicorn that starts draining the queue as soon as its shutdown begins.

    uvicorn waits up to ``timeout_graceful_shutdown`` for requests, cancels what is left, and
    only then runs the lifespan shutdown: a queue drained there would be too late to answer
    anyone. Draining from the start of the shutdown instead keeps running queued work and
    answers whatever cannot finish in time with 503 ``backend_unavailable``.
    """

    def __init__(self, config: uvicorn.Config, state: ServiceState) -> None:
        super().__init__(config)
        self.state = state

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        graceful = self.config.timeout_graceful_shutdown
        # None: uvicorn waits for requests without a limit; drain as the lifespan would.
        settings = self.state.settings
        drain = settings.shutdown_timeout_s if graceful is None else drain_deadline_s(graceful)
        begin_shutdown(self.state, drain)
        await super().shutdown(sockets)


KEEP_ALIVE_S = 5


class StartupErrorInOneLine:
    """The app, whose failed startup uvicorn does not log as a traceback: Starlette hands
    uvicorn the formatted traceback of whatever stopped the lifespan (a model that cannot
    load), which it logs; :func:`run_server` raises that error instead, for the command to
    report in one line (or, for a bug, as Python's traceback)."""

    def __init__(self, app: FastAPI, state: ServiceState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def lifespan_send(message: Any) -> None:
            if message["type"] == "lifespan.startup.failed" and self.state.startup_error:
                message = {**message, "message": ""}
            await send(message)

        await self.app(scope, receive, lifespan_send)


def uvicorn_config(settings: Settings, app: FastAPI) -> uvicorn.Config:
    return uvicorn.Config(
        StartupErrorInOneLine(app, app.state.service),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        # uvicorn's own lines ("Started server process", errors in the ASGI app) go through
        # the root handler in the service's one format (cli.py), not uvicorn's "INFO:     ...":
        # one parser for the whole log.
        log_config=None,
        # On SIGTERM: stop accepting, let in-flight requests finish up to this long (the queue
        # drains meanwhile, see Server), then run the lifespan shutdown. uvicorn annotates an
        # int but only hands it to asyncio.timeout: int() cut 0.5 s to 0 (nothing drained).
        timeout_graceful_shutdown=settings.shutdown_timeout_s,  # type: ignore[arg-type]
        # A single worker process: the in-process queue and the models live in it.
        workers=1,
        access_log=False,
        # Nothing reads the client's address or scheme (no access log; the gateway logs and
        # rate-limits by address): uvicorn's X-Forwarded-* middleware would only cost time.
        proxy_headers=False,
        # Idle keep-alive connections close after this; the gateway's upstream keep-alive
        # (deploy/nginx) must stay below it.
        timeout_keep_alive=KEEP_ALIVE_S,
        lifespan="on",
        # loop "auto": uvloop (a dependency) when importable; http: httptools' protocol with
        # the service's JSON answer to a request it cannot parse.
        http=HTTP,
    )


def run_server(settings: Settings) -> None:
    app = create_app(settings)
    state: ServiceState = app.state.service
    try:
        Server(uvicorn_config(settings, app), state).run()
    except SystemExit:  # uvicorn's exit status 3 when the startup fails
        if state.startup_error is not None:
            raise state.startup_error from None
        raise

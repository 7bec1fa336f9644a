"""Run the API under uvicorn with a graceful shutdown."""

from __future__ import annotations

import socket

import uvicorn

from service.api.app import begin_shutdown, create_app
from service.api.deps import ServiceState
from service.config import Settings


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


def uvicorn_config(settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        # uvicorn's own lines ("Started server process", errors in the ASGI app) go through
        # the root handler in the service's one format (cli.py), not uvicorn's "INFO:     ...":
        # one parser for the whole log.
        log_config=None,
        # On SIGTERM: stop accepting, let in-flight requests finish up to this long (the queue
        # drains meanwhile, see Server), then run the lifespan shutdown.
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
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
        # loop/http "auto": uvloop and httptools (dependencies) when importable.
    )


def run_server(settings: Settings) -> None:
    config = uvicorn_config(settings)
    Server(config, config.app.state.service).run()

"""Run the API under uvicorn with a graceful shutdown."""

from __future__ import annotations

import uvicorn

from service.api.app import create_app
from service.config import Settings


def uvicorn_config(settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        # On SIGTERM: stop accepting, let in-flight requests finish up to this long, then
        # run the lifespan shutdown (which drains the queue).
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
        # A single worker process: the in-process queue and the models live in it.
        workers=1,
        access_log=False,
        lifespan="on",
        # loop/http "auto": uvloop and httptools (dependencies) when importable.
    )


def run_server(settings: Settings) -> None:
    uvicorn.Server(uvicorn_config(settings)).run()

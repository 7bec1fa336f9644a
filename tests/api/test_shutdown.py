"""Graceful shutdown: in-flight requests finish, new connections are refused."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from service.api.app import create_app
from tests.service_support import LiveServer, make_settings, wait_for

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _refused(url: str) -> bool:
    try:
        async with httpx.AsyncClient(base_url=url, timeout=1) as c:
            await c.get("/healthz")
    except httpx.TransportError:
        return True
    return False


async def test_in_flight_requests_finish_on_shutdown(model_repo):
    settings = make_settings(model_repo, shutdown_timeout_s=10)
    srv = await LiveServer(create_app(settings), settings).start()
    q = srv.queue
    q.pause()
    try:
        async with srv.client() as c:
            inflight = [
                asyncio.create_task(c.post("/v1/polarity", json={"text": t}))
                for t in ("great fun", "dull plot", "superb cast")
            ]
            await wait_for(lambda: q.depth("polarity-en") == 3)
            stopping = asyncio.create_task(srv.stop())  # what SIGTERM does: should_exit
            # Stopped accepting: a new connection is refused while the three still wait.
            t0 = asyncio.get_running_loop().time()
            while not await _refused(srv.url):
                assert asyncio.get_running_loop().time() - t0 < 10
                await asyncio.sleep(0.05)
            assert not any(t.done() for t in inflight)
            q.resume()
            responses = await asyncio.gather(*inflight)
            await stopping
    finally:  # a failure above must not leave the server running on the session's loop
        q.resume()
        await srv.stop()
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert [r.json()["label"] for r in responses] == ["positive", "negative", "positive"]
    assert not await q.is_ready()  # lifespan shutdown closed the queue

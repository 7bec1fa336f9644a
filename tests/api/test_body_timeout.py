"""A request whose body stops arriving gets 408 ``body_timeout`` (NLPSERVE_BODY_TIMEOUT_S)
and its connection is closed; slow but complete bodies, and requests that wait in the queue
longer than the timeout once their body is in, are served as usual.

Over real HTTP from a raw socket, with the prediction fast path on and off (each reads the
body its own way)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.service_support import (
    LiveServer,
    live_server,
    make_settings,
    metric_value,
    read_metrics,
    wait_for,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

TIMEOUT_S = 1.0


@pytest_asyncio.fixture(scope="module", loop_scope="session", params=[True, False])
async def srv(model_repo, request) -> AsyncIterator[LiveServer]:
    settings = make_settings(model_repo, body_timeout_s=TIMEOUT_S, fast_path=request.param)
    async with live_server(settings) as s:
        yield s


def _head(length: int) -> bytes:
    return (
        f"POST /v1/polarity HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(ln.lower().split(": ", 1) for ln in lines[1:] if ln)
    body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, body


async def test_stalled_body_gets_408_and_the_connection_closes(srv):
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        t0 = time.monotonic()  # before the server can start its clock: the lower bound is safe
        writer.write(_head(100) + b'{"text":"good film"}')  # 20 of the 100 bytes, then nothing
        await writer.drain()
        # a stalled body never timed out would be left waiting: wait_for's TimeoutError
        status, headers, body = await asyncio.wait_for(_read_response(reader), 30)
        waited = time.monotonic() - t0
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the server closed it
    finally:
        writer.close()
    assert status == 408
    assert headers["content-type"].startswith("application/json")
    assert headers["connection"] == "close"
    assert "x-request-id" in headers
    err = json.loads(body)["error"]
    assert err["code"] == "body_timeout"
    assert "waited 1 s for the rest of the request body" in err["message"]
    # not before the timeout (timers only run late); 408 body_timeout says which path answered
    assert waited >= TIMEOUT_S * 0.9, waited
    async with srv.client() as c:
        metrics = await read_metrics(c)
    assert metric_value(
        metrics, "nlpserve_rejected_total", model="polarity-en", reason="body_timeout"
    )


async def test_slow_but_complete_body_is_served(srv):
    body = json.dumps({"text": "a superb and charming film"}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    try:
        writer.write(_head(len(body)))
        for i in range(0, len(body), 8):  # in pieces, within the timeout all together
            writer.write(body[i : i + 8])
            await writer.drain()
            await asyncio.sleep(0.05)
        status, _, answer = await asyncio.wait_for(_read_response(reader), 10)
    finally:
        writer.close()
    assert status == 200, answer
    assert json.loads(answer)["label"] == "positive"


async def test_time_in_the_queue_does_not_count(srv):
    """The timeout covers reading the body only: after that, receive() waits for a
    disconnect for as long as the request runs."""
    q = srv.queue
    q.pause()
    try:
        async with srv.client() as c:
            pending = asyncio.create_task(c.post("/v1/polarity", json={"text": "a dull plot"}))
            await wait_for(lambda: q.depth("polarity-en") == 1)
            await asyncio.sleep(TIMEOUT_S * 1.5)
            assert not pending.done()
            q.resume()
            r = await pending
    finally:
        q.resume()
    assert r.status_code == 200, r.text
    assert r.json()["label"] == "negative"

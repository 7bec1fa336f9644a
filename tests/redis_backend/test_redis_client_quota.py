"""The per-client in-flight limit across API replicas in Redis mode
(``NLPSERVE_CLIENT_QUOTA_SCOPE=global``, service/queueing/redis_client_counts.py): two real
replicas (uvicorn, real keys) share a real Redis and a worker whose batches wait at a gate, so
that requests stay in flight. A client at its limit on one replica is refused on the other;
a release on either gives room back; the items of a replica that never releases them stop
counting after their deadline; a client gone (and a cancellation while the count is asked)
releases; an admission redis-py sends again (its answer lost) is admitted once; a reload's
new limit applies on both; Redis away is a 503, not a 500; an idle client leaves no key
behind; ``replica`` scope counts per replica as before."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from asyncio import Event
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from service.api.client_quota import ClientQuota
from service.api.errors import ApiError
from service.config import Settings
from service.queueing.base import BackendUnavailableError
from service.queueing.redis_client_counts import RedisClientCounts
from service.queueing.redis_keys import client_in_flight_key
from service.queueing.redis_queue import RedisQueue
from tests.redis_backend.helpers import running_worker, wait_for
from tests.service_support import GatedRunner, LiveServer, live_server, metric_value, read_metrics

POL = "polarity-en"
ALICE, BOB = "alice-global-quota-key-0123", "bob-global-quota-key-456789"
LIMIT = 2
ACROSS = "items in flight across the API replicas"
OWN = "this client's max_in_flight in NLPSERVE_API_KEYS_FILE"
# A script that keeps Redis from every other client for ARGV[1] microseconds.
BUSY = (
    "local t = redis.call('TIME') local s = t[1] * 1e6 + t[2] "
    "repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] - s > tonumber(ARGV[1]) return 1"
)


def write_keys(path: Path, limit: int = LIMIT) -> Path:
    path.write_text(f"alice {ALICE} max_in_flight={limit}\nbob {BOB}\n")  # bob: no limit
    return path


def quota(srv: LiveServer) -> ClientQuota:
    q = srv.state.client_quota
    assert q is not None
    return q


def counts(srv: LiveServer) -> RedisClientCounts:
    queue = srv.state.queue
    assert isinstance(queue, RedisQueue)
    return queue.shared_in_flight()


def post(
    c: httpx.AsyncClient, key: str, n: int = 1, deadline_ms: int | None = None
) -> asyncio.Task[httpx.Response]:
    body = {"inputs": [{"text": f"a fine film {i}"} for i in range(n)]}
    headers = {"X-API-Key": key}
    if deadline_ms is not None:
        headers["X-Deadline-Ms"] = str(deadline_ms)
    return asyncio.create_task(c.post("/v1/polarity", json=body, headers=headers))


def assert_refused(r: httpx.Response, held: int, limit: int = LIMIT) -> None:
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) >= 1
    message = r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "client_quota"
    assert f"this client has {held} {ACROSS} and this request needs 1 more" in message
    assert f"the limit for this client is {limit} ({OWN})" in message


@contextlib.asynccontextmanager
async def replicas(settings: Settings, gated: GatedRunner | None) -> AsyncIterator[tuple]:
    """A worker (batches at ``gated``'s gate) and two API replicas with their clients."""
    async with contextlib.AsyncExitStack() as stack:
        if gated is not None:
            await stack.enter_async_context(running_worker(settings, {POL: gated}))
        a = await stack.enter_async_context(live_server(settings))
        b = await stack.enter_async_context(live_server(settings))
        ca = await stack.enter_async_context(a.client())
        cb = await stack.enter_async_context(b.client())
        yield a, b, ca, cb


@pytest.fixture
async def admin(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def settings(make_settings, tmp_path: Path) -> Settings:
    return make_settings(
        max_batch_size=1,
        inference_threads=1,
        prefetch_batches=1,
        api_keys_file=write_keys(tmp_path / "keys"),
        load_models=POL,
    )


async def test_a_client_at_its_limit_on_one_replica_is_refused_on_the_other(
    settings, tiny_runners, admin
) -> None:
    gated = GatedRunner(tiny_runners[POL])
    alice = client_in_flight_key(settings.redis_prefix, "alice")
    async with replicas(settings, gated) as (a, b, ca, cb):
        try:
            held = [post(ca, ALICE)]
            await wait_for(lambda: quota(a).in_flight == {"alice": 1})
            held.append(post(cb, ALICE))
            await wait_for(lambda: quota(b).in_flight == {"alice": 1})
            assert await admin.zcard(alice) == 2
            assert 0 < await admin.ttl(alice) <= settings.default_deadline_ms / 1000 + 7
            for c in (ca, cb):  # each replica holds 1: the limit counts both
                assert_refused(await post(c, ALICE), held=2)
            # more than the limit in one request: 422 at once, nothing counted
            r = await post(cb, ALICE, 3)
            assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_items"
            assert f"at most 2 in flight across the API replicas ({OWN})" in r.text
            assert await admin.zcard(alice) == 2
            # a client without a limit is counted on its replica only: nothing in Redis
            held.append(post(ca, BOB))
            await wait_for(lambda: quota(a).in_flight.get("bob") == 1)
            assert not await admin.exists(client_in_flight_key(settings.redis_prefix, "bob"))
            # each replica's gauge is its share
            for c in (ca, cb):
                text = await read_metrics(c)
                assert metric_value(text, "nlpserve_client_in_flight", client="alice") == 1
                refused = "nlpserve_client_quota_rejections_total"
                assert metric_value(text, refused, client="alice") == 1
        finally:
            gated.gate.set()
        assert [(await t).status_code for t in held] == [200] * 3
        # every request released before it was answered: room at once, nothing left
        assert not quota(a).in_flight and not quota(b).in_flight
        assert not await admin.exists(alice)

        # a release on either replica gives room on the other
        gated.gate.clear()
        try:
            short = post(ca, ALICE, deadline_ms=400)
            long = post(cb, ALICE)
            await wait_for(lambda: bool(quota(a).in_flight and quota(b).in_flight))
            assert_refused(await post(cb, ALICE), held=2)
            assert (await short).status_code == 504  # ended on A...
            assert await admin.zcard(alice) == 1
            third = post(cb, ALICE)  # ... so B admits another
            await wait_for(lambda: quota(b).in_flight == {"alice": 2})
            assert await admin.zcard(alice) == 2
        finally:
            gated.gate.set()
        assert (await long).status_code == 200 and (await third).status_code == 200
        assert not await admin.exists(alice)


async def test_a_replica_that_never_releases_holds_nothing_past_the_deadline(
    settings, tiny_runners, admin
) -> None:
    gated = GatedRunner(tiny_runners[POL])
    gated.gate.set()
    alice = client_in_flight_key(settings.redis_prefix, "alice")
    async with replicas(settings, gated) as (a, b, ca, cb):
        # as a replica that died after admitting 2 items of alice's: never released
        dead = counts(a)
        dead.margin_s = 0.2
        deadline_s = 0.6
        deadline = time.monotonic() + deadline_s
        admitted, held = await dead.acquire("alice", "dead", 2, LIMIT, deadline)
        assert (admitted, held) == (True, 0)
        assert await admin.ttl(alice) <= 2  # the set lives as long as its latest item
        assert_refused(await post(cb, ALICE), held=2)
        await asyncio.sleep(deadline_s + dead.margin_s + 0.1)
        assert (await post(cb, ALICE)).status_code == 200  # they stopped counting
        assert not await admin.exists(alice)  # and went with this admission


async def test_a_client_gone_and_a_cancelled_admission_release(
    settings, tiny_runners, admin
) -> None:
    gated = GatedRunner(tiny_runners[POL])
    alice = client_in_flight_key(settings.redis_prefix, "alice")

    async def gone() -> bool:
        return not await admin.exists(alice)

    async with replicas(settings, gated) as (a, b, ca, cb):
        try:
            # the client goes away while its request is queued
            body = json.dumps({"text": "gone"}).encode()
            request = (
                f"POST /v1/polarity HTTP/1.1\r\nHost: x\r\nX-API-Key: {ALICE}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body
            _, writer = await asyncio.open_connection("127.0.0.1", a.port)
            writer.write(request)
            await writer.drain()
            await wait_for(lambda: quota(a).in_flight == {"alice": 1})
            assert await admin.zcard(alice) == 1
            writer.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            writer.close()
            await wait_for(lambda: not quota(a).in_flight)
            await wait_for(gone)  # released while its entry still waits at the gate
        finally:
            gated.gate.set()

        # cancelled at any point of its admission (the script sent or not, answered or
        # not): nothing stays counted
        q = quota(b)
        for turns in range(8):

            async def one() -> None:
                async with q.hold("alice", 2, time.monotonic() + 5):
                    await asyncio.sleep(30)

            task = asyncio.create_task(one())
            for _ in range(turns):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await wait_for(gone)
            assert not q.in_flight, turns


async def test_a_reload_changes_the_limit_on_every_replica(
    settings, tiny_runners, admin, tmp_path
) -> None:
    gated = GatedRunner(tiny_runners[POL])
    assert settings.api_keys_file is not None
    async with replicas(settings, gated) as (a, b, ca, cb):
        try:
            held = [post(ca, ALICE), post(cb, ALICE)]
            await wait_for(lambda: bool(quota(a).in_flight and quota(b).in_flight))
            assert_refused(await post(ca, ALICE), held=2)

            write_keys(settings.api_keys_file, 3)  # raised
            for srv in (a, b):
                assert srv.state.api_keys is not None and srv.state.api_keys.reload()
            held.append(post(cb, ALICE))
            await wait_for(lambda: quota(b).in_flight == {"alice": 2})
            assert_refused(await post(ca, ALICE), held=3, limit=3)

            write_keys(settings.api_keys_file, 1)  # lowered: what is in flight stays
            for srv in (a, b):
                assert srv.state.api_keys is not None and srv.state.api_keys.reload()
            assert_refused(await post(ca, ALICE), held=3, limit=1)
        finally:
            gated.gate.set()
        assert [(await t).status_code for t in held] == [200] * 3
        assert (await post(ca, ALICE)).status_code == 200  # under it again


async def test_redis_away_is_a_503_at_admission(make_settings, own_redis, tmp_path) -> None:
    settings = make_settings(
        redis_url=own_redis.url, api_keys_file=write_keys(tmp_path / "keys"), load_models=POL
    )
    async with live_server(settings) as srv, srv.client() as c:
        counted = quota(srv).shared
        assert counted is not None
        own_redis.stop()
        # at once (the connection fails) and once the replica knows (not ready)
        for when in ("at once", "known"):
            if when == "known":
                await wait_for(lambda: not srv.state.queue._ready)  # type: ignore[union-attr]
            r = await post(c, ALICE)
            assert r.status_code == 503, (when, r.text)
            assert r.json()["error"]["code"] == "backend_unavailable"
            assert "the queue backend (Redis) is unreachable" in r.json()["error"]["message"]
            assert int(r.headers["retry-after"]) >= 1
            assert not quota(srv).in_flight


async def test_replica_scope_counts_each_replica_alone(
    make_settings, tiny_runners, admin, tmp_path
) -> None:
    settings = make_settings(
        max_batch_size=1,
        inference_threads=1,
        prefetch_batches=1,
        api_keys_file=write_keys(tmp_path / "keys"),
        load_models=POL,
        client_quota_scope="replica",
    )
    gated = GatedRunner(tiny_runners[POL])
    async with replicas(settings, gated) as (a, b, ca, cb):
        assert quota(a).shared is None
        try:
            held = [post(ca, ALICE), post(ca, ALICE)]
            await wait_for(lambda: quota(a).in_flight == {"alice": 2})
            r = await post(ca, ALICE)
            assert r.status_code == 429
            assert "this client has 2 items in flight and this request needs 1" in r.text
            held.append(post(cb, ALICE))  # B counts its own
            await wait_for(lambda: quota(b).in_flight == {"alice": 1})
            key = client_in_flight_key(settings.redis_prefix, "alice")
            assert not await admin.exists(key)
        finally:
            gated.gate.set()
        assert [(await t).status_code for t in held] == [200] * 3


async def burst(servers: tuple[LiveServer, ...], n: int) -> tuple[list[asyncio.Task], Event]:
    """``n`` holds of one item of alice's on each of ``servers`` at once; those admitted
    wait for the event; returns once every refused one has ended."""
    release = asyncio.Event()

    async def one(srv: LiveServer) -> None:
        async with quota(srv).hold("alice", 1, time.monotonic() + 5):
            await release.wait()

    tasks = [asyncio.create_task(one(srv)) for srv in servers * n]
    await wait_for(lambda: sum(t.done() for t in tasks) == len(tasks) - LIMIT)
    return tasks, release


async def test_a_burst_on_both_replicas_admits_exactly_the_limit(settings, admin) -> None:
    """Admissions of one moment share a pipeline (the script still runs once per request, so
    two replicas' bursts admit exactly the limit between them), also after Redis lost its
    scripts (NOSCRIPT: loaded again, the burst sent again)."""
    alice = client_in_flight_key(settings.redis_prefix, "alice")
    async with replicas(settings, None) as (a, b, _, _):
        for flushed in (False, True):
            if flushed:
                await admin.script_flush()
            tasks, release = await burst((a, b), 10)
            assert await admin.zcard(alice) == LIMIT, flushed
            refused = [t.exception() for t in tasks if t.done()]
            assert all(isinstance(e, ApiError) and e.status_code == 429 for e in refused)
            release.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            assert not await admin.exists(alice)


async def test_an_admission_sent_again_after_its_answer_was_lost_is_admitted(
    settings, admin
) -> None:
    """redis-py sends a command again when its answer does not come (a timeout, a reset
    connection: ``Retry`` in make_client) though the script may have run: that admission
    finds its own items and is admitted, not refused by them (a 429 whose items would then
    stay counted, never released, until they expire)."""
    alice = client_in_flight_key(settings.redis_prefix, "alice")
    async with replicas(settings, None) as (a, _, _, _):
        shared = counts(a)
        deadline = time.monotonic() + 5
        assert await shared.acquire("alice", "once", 1, 1, deadline) == (True, 0)
        assert await shared.acquire("alice", "once", 1, 1, deadline) == (True, 0)  # again
        assert await admin.zcard(alice) == 1
        assert await shared.acquire("alice", "other", 1, 1, deadline) == (False, 1)
        await shared.release("alice", "once", 1)
        assert not await admin.exists(alice)


async def test_redis_slower_than_the_socket_timeout_admits_once(
    make_settings, admin, tmp_path
) -> None:
    """Redis busy past NLPSERVE_REDIS_SOCKET_TIMEOUT_S while an admission waits: redis-py
    gives up on the first connection (the script still runs there once Redis is free) and
    sends it again; the request is admitted, and its release leaves nothing."""
    settings = make_settings(
        api_keys_file=write_keys(tmp_path / "keys", 1),
        load_models=POL,
        redis_socket_timeout_s=0.3,
    )
    alice = client_in_flight_key(settings.redis_prefix, "alice")
    async with replicas(settings, None) as (a, _, _, _):
        q = quota(a)
        await counts(a).release("alice", "warm", 1)  # a connection open, the script loaded
        blocked = asyncio.create_task(admin.eval(BUSY, 0, 500_000))  # past the first try
        await asyncio.sleep(0.05)
        async with q.hold("alice", 1, time.monotonic() + 5):
            assert await admin.zcard(alice) == 1
        await blocked
        assert not await admin.exists(alice)


async def test_an_admission_that_got_no_answer_at_all_gives_its_items_back(
    make_settings, admin, tmp_path
) -> None:
    """Redis busy past both tries of redis-py (the first and its retry time out): a 503, and
    the script, still queued on the first connection, runs once Redis is free; its items
    are given back then, not counted until they expire (the deadline and a margin: 35 s)."""
    settings = make_settings(
        api_keys_file=write_keys(tmp_path / "keys", 1),
        load_models=POL,
        redis_socket_timeout_s=0.3,
    )
    alice = client_in_flight_key(settings.redis_prefix, "alice")

    async def gone() -> bool:
        return not await admin.exists(alice)

    async with replicas(settings, None) as (a, _, _, _):
        await counts(a).release("alice", "warm", 1)  # a connection open, the script loaded
        blocked = asyncio.create_task(admin.eval(BUSY, 0, 800_000))  # past both tries
        await asyncio.sleep(0.05)
        with pytest.raises(BackendUnavailableError):
            async with quota(a).hold("alice", 1, time.monotonic() + 30):
                pass
        assert not quota(a).in_flight
        await blocked
        await wait_for(gone, timeout=3)

"""The per-client in-flight limit across API replicas in Redis mode
(``NLPSERVE_CLIENT_QUOTA_SCOPE=global``, service/queueing/redis_client_counts.py): two real
replicas (uvicorn, real keys) share a real Redis and a worker whose batches wait at a gate, so
that requests stay in flight. A client at its limit on one replica is refused on the other;
a release on either gives room back; the items of a replica that never releases them stop
counting after their deadline; a client gone (and a cancellation while the count is asked)
releases; an admission whose answer is lost (a proxy drops it) and that redis-py sends again
is admitted once, or given back when no answer comes at all; a reload's new limit applies
on both; Redis away is a 503, not a 500; an idle client leaves no key behind; ``replica``
scope counts per replica as before."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from asyncio import Event
from pathlib import Path

import httpx
import pytest

from service.api.client_quota import ClientQuota
from service.api.errors import ApiError
from service.config import Settings
from service.queueing.base import BackendUnavailableError
from service.queueing.redis_client_counts import ACQUIRE_LUA, RedisClientCounts
from service.queueing.redis_keys import client_in_flight_key
from service.queueing.redis_queue import RedisQueue
from tests.redis_backend.helpers import two_replicas, wait_for
from tests.service_support import (
    GatedRunner,
    LiveServer,
    live_server,
    metric_value,
    post_polarity,
    read_metrics,
)

POL = "polarity-en"
ALICE, BOB = "alice-global-quota-key-0123", "bob-global-quota-key-456789"
LIMIT = 2
ACROSS = "items in flight across the API replicas"
OWN = "this client's max_in_flight in NLPSERVE_API_KEYS_FILE"


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


def assert_refused(r: httpx.Response, held: int, limit: int = LIMIT) -> None:
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) >= 1
    message = r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "client_quota"
    assert f"this client has {held} {ACROSS} and this request needs 1 more" in message
    assert f"the limit for this client is {limit} ({OWN})" in message
    assert r.json()["error"]["limit"] == {"name": "max_in_flight", "value": limit}


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
    async with two_replicas(settings, {POL: gated}) as (a, b, ca, cb):
        try:
            held = [post_polarity(ca, ALICE)]
            await wait_for(lambda: quota(a).in_flight == {"alice": 1})
            held.append(post_polarity(cb, ALICE))
            await wait_for(lambda: quota(b).in_flight == {"alice": 1})
            assert await admin.zcard(alice) == 2
            assert 0 < await admin.ttl(alice) <= settings.default_deadline_ms / 1000 + 7
            for c in (ca, cb):  # each replica holds 1: the limit counts both
                assert_refused(await post_polarity(c, ALICE), held=2)
            # more than the limit in one request: 422 at once, nothing counted
            r = await post_polarity(cb, ALICE, 3)
            assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_items"
            assert f"at most 2 in flight across the API replicas ({OWN})" in r.text
            assert r.json()["error"]["limit"] == {"name": "max_in_flight", "value": 2}
            assert await admin.zcard(alice) == 2
            # a client without a limit is counted on its replica only: nothing in Redis
            held.append(post_polarity(ca, BOB))
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
            short = post_polarity(ca, ALICE, deadline_ms=400)
            long = post_polarity(cb, ALICE)
            await wait_for(lambda: bool(quota(a).in_flight and quota(b).in_flight))
            assert_refused(await post_polarity(cb, ALICE), held=2)
            assert (await short).status_code == 504  # ended on A...
            assert await admin.zcard(alice) == 1
            third = post_polarity(cb, ALICE)  # ... so B admits another
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
    async with two_replicas(settings, {POL: gated}) as (a, b, ca, cb):
        # as a replica that died after admitting 2 items of alice's: never released
        dead = counts(a)
        dead.margin_s = 0.2
        deadline_s = 0.6
        deadline = time.monotonic() + deadline_s
        admitted, held = await dead.acquire("alice", "dead", 2, LIMIT, deadline)
        assert (admitted, held) == (True, 0)
        assert await admin.ttl(alice) <= 2  # the set lives as long as its latest item
        assert_refused(await post_polarity(cb, ALICE), held=2)
        await asyncio.sleep(deadline_s + dead.margin_s + 0.1)
        assert (await post_polarity(cb, ALICE)).status_code == 200  # they stopped counting
        assert not await admin.exists(alice)  # and went with this admission


async def test_a_client_gone_and_a_cancelled_admission_release(
    settings, tiny_runners, admin
) -> None:
    gated = GatedRunner(tiny_runners[POL])
    alice = client_in_flight_key(settings.redis_prefix, "alice")

    async def gone() -> bool:
        return not await admin.exists(alice)

    async def uncounted() -> bool:  # a tombstone may stay: the admission's answer not awaited
        return await admin.zcount(alice, "(0", "+inf") == 0

    async with two_replicas(settings, {POL: gated}) as (a, b, ca, cb):
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
            await wait_for(uncounted)
            assert not q.in_flight, turns


async def test_a_reload_changes_the_limit_on_every_replica(
    settings, tiny_runners, admin, tmp_path
) -> None:
    gated = GatedRunner(tiny_runners[POL])
    assert settings.api_keys_file is not None
    async with two_replicas(settings, {POL: gated}) as (a, b, ca, cb):
        try:
            held = [post_polarity(ca, ALICE), post_polarity(cb, ALICE)]
            await wait_for(lambda: bool(quota(a).in_flight and quota(b).in_flight))
            assert_refused(await post_polarity(ca, ALICE), held=2)

            write_keys(settings.api_keys_file, 3)  # raised
            for srv in (a, b):
                assert srv.state.api_keys is not None and srv.state.api_keys.reload()
            held.append(post_polarity(cb, ALICE))
            await wait_for(lambda: quota(b).in_flight == {"alice": 2})
            assert_refused(await post_polarity(ca, ALICE), held=3, limit=3)

            write_keys(settings.api_keys_file, 1)  # lowered: what is in flight stays
            for srv in (a, b):
                assert srv.state.api_keys is not None and srv.state.api_keys.reload()
            assert_refused(await post_polarity(ca, ALICE), held=3, limit=1)
        finally:
            gated.gate.set()
        assert [(await t).status_code for t in held] == [200] * 3
        assert (await post_polarity(ca, ALICE)).status_code == 200  # under it again


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
            r = await post_polarity(c, ALICE)
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
    async with two_replicas(settings, {POL: gated}) as (a, b, ca, cb):
        assert quota(a).shared is None
        try:
            held = [post_polarity(ca, ALICE), post_polarity(ca, ALICE)]
            await wait_for(lambda: quota(a).in_flight == {"alice": 2})
            r = await post_polarity(ca, ALICE)
            assert r.status_code == 429
            assert "this client has 2 items in flight and this request needs 1" in r.text
            held.append(post_polarity(cb, ALICE))  # B counts its own
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
    async with two_replicas(settings, None) as (a, b, _, _):
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
    async with two_replicas(settings, None) as (a, _, _, _):
        shared = counts(a)
        deadline = time.monotonic() + 5
        assert await shared.acquire("alice", "once", 1, 1, deadline) == (True, 0)
        assert await shared.acquire("alice", "once", 1, 1, deadline) == (True, 0)  # again
        assert await admin.zcard(alice) == 1
        assert await shared.acquire("alice", "other", 1, 1, deadline) == (False, 1)
        await shared.release("alice", "once", 1, deadline)
        assert not await admin.exists(alice)


class AnswerDropper:
    """A TCP proxy to Redis that passes every command on, and throws away the answers of the
    next :attr:`drop` connections that send a script (EVALSHA) from then on: a script that
    ran, its answer lost (Redis slower than the socket timeout, a reset connection); other
    connections are answered."""

    def __init__(self, url: str) -> None:
        self.upstream = url.removeprefix("redis://").split("/")[0].rsplit(":", 1)
        self.drop = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def _pipe(
        self, r: asyncio.StreamReader, w: asyncio.StreamWriter, lost: list[bool], up: bool
    ) -> None:
        try:
            while data := await r.read(65536):
                if up and self.drop and not lost[0] and b"evalsha" in data.lower():
                    lost[0] = True  # this connection's answers from now on
                    self.drop -= 1
                if up or not lost[0]:
                    w.write(data)
                    await w.drain()
        except ConnectionError:
            pass
        finally:
            w.close()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        host, port = self.upstream
        ur, uw = await asyncio.open_connection(host, int(port))
        lost = [False]
        for task in (
            asyncio.create_task(self._pipe(cr, uw, lost, up=True)),
            asyncio.create_task(self._pipe(ur, cw, lost, up=False)),
        ):
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.mark.parametrize("lost", [1, 2])
async def test_an_admission_whose_answer_was_lost_counts_once_and_goes(
    make_settings, redis_url, admin, tmp_path, lost
) -> None:
    """The script ran and its answer was lost: redis-py sends it again (``Retry`` in
    make_client), and that run finds the request's items: admitted, counted once (it was
    refused by them, 429, and they stayed counted until they expired: the deadline and a
    margin, 35 s, the client at its limit of 1 locked out that long). Lost on the retry too:
    a 503, and the items are given back."""
    proxy = AnswerDropper(redis_url)
    async with proxy as url:
        settings = make_settings(
            redis_url=url,
            api_keys_file=write_keys(tmp_path / "keys", 1),
            load_models=POL,
            redis_socket_timeout_s=0.3,
        )
        alice = client_in_flight_key(settings.redis_prefix, "alice")

        async def gone() -> bool:
            return not await admin.exists(alice)

        async def uncounted() -> bool:
            return await admin.zcount(alice, "(0", "+inf") == 0

        async with live_server(settings) as a:
            await admin.script_load(ACQUIRE_LUA)
            proxy.drop = lost
            if lost == 1:
                async with quota(a).hold("alice", 1, time.monotonic() + 30):
                    assert await admin.zcard(alice) == 1
                assert await gone()
            else:
                with pytest.raises(BackendUnavailableError):
                    async with quota(a).hold("alice", 1, time.monotonic() + 30):
                        pass
                assert not quota(a).in_flight
                # counted nothing, the tombstone left: a run of it later counts nothing
                await wait_for(uncounted, timeout=3)
                assert await admin.zcard(alice) == 1


async def test_a_limit_given_on_reload_counts_the_items_already_in_flight(
    settings, tiny_runners, admin
) -> None:
    """A client without a limit is counted on its replica only; a reload that gives it one
    adds its items in flight on each replica to Redis, so that the new limit counts them on
    every replica at once (they were left out: the client was admitted up to the new limit
    more, across replicas, until they ended)."""
    gated = GatedRunner(tiny_runners[POL])
    assert settings.api_keys_file is not None
    bob = client_in_flight_key(settings.redis_prefix, "bob")
    async with two_replicas(settings, {POL: gated}) as (a, b, ca, cb):
        try:
            held = [post_polarity(ca, BOB), post_polarity(ca, BOB), post_polarity(cb, BOB)]
            await wait_for(lambda: quota(a).in_flight == {"bob": 2})
            await wait_for(lambda: quota(b).in_flight == {"bob": 1})
            assert not await admin.exists(bob)
            settings.api_keys_file.write_text(f"alice {ALICE}\nbob {BOB} max_in_flight=3\n")
            for srv in (a, b):
                assert srv.state.api_keys is not None and srv.state.api_keys.reload()

            async def counted() -> bool:
                return await admin.zcount(bob, "(0", "+inf") == 3

            await wait_for(counted)
            for c in (ca, cb):  # at the new limit on both replicas
                assert_refused(await post_polarity(c, BOB), held=3, limit=3)
        finally:
            gated.gate.set()
        assert [(await t).status_code for t in held] == [200] * 3
        # released as they ended, each with a tombstone (its count was sent from a task:
        # the release may have overtaken it)
        assert await admin.zcount(bob, "(0", "+inf") == 0
        assert await admin.zcard(bob) == 3
        assert (await post_polarity(cb, BOB)).status_code == 200


async def test_an_admission_that_redis_runs_after_its_release_counts_nothing(
    settings, admin
) -> None:
    """Redis busy past both of redis-py's tries: the replica answers 503 and releases, and
    the admission, sent again or late, may run after the release (sent here first). The
    release of an admission without an answer leaves a tombstone: the admission counts
    nothing (it counted its items until they expired, deadline + 5 s, a client at its limit
    locked out that long), the tombstone is never counted, and it goes with the items'
    expiry. A release after an answer leaves none: the set goes with its last item."""
    alice = client_in_flight_key(settings.redis_prefix, "alice")
    async with two_replicas(settings, None) as (a, _, _, _):
        shared = counts(a)
        shared.margin_s = 0.2
        deadline = time.monotonic() + 0.5
        await shared.release("alice", "late", 2, deadline, answered=False)
        assert await shared.acquire("alice", "late", 2, LIMIT, deadline) == (False, 0)
        await shared.release("alice", "added", 1, deadline, answered=False)
        await shared.add("alice", "added", 1, deadline)  # a reload's count, late: the same
        assert await admin.zcount(alice, "(0", "+inf") == 0
        # the whole limit is there for other requests, and not one item more
        assert await shared.acquire("alice", "other", 2, LIMIT, deadline) == (True, 0)
        assert await shared.acquire("alice", "other", 2, LIMIT, deadline) == (True, 0)  # again
        assert await shared.acquire("alice", "more", 1, LIMIT, deadline) == (False, 2)
        await shared.release("alice", "other", 2, deadline)
        assert await admin.zcard(alice) == 2  # the tombstones of late and added
        await wait_for(lambda: _gone(admin, alice), timeout=4)

        await shared.acquire("alice", "answered", 1, LIMIT, time.monotonic() + 5)
        await shared.release("alice", "answered", 1, time.monotonic() + 5)
        assert not await admin.exists(alice)


async def _gone(admin, key: str) -> bool:
    return not await admin.exists(key)

"""The per-client rate limit across API replicas in Redis mode
(``NLPSERVE_CLIENT_QUOTA_SCOPE=global``: one token bucket per client in Redis,
service/queueing/redis_client_counts.py): two real replicas (uvicorn, real keys) share a real
Redis and a worker. Tokens one replica takes are gone on the other; time passing (the
bucket's ``last`` moved back, not a sleep) refills it for both; a reload's new rate applies on
both; a burst of takes on both replicas at once takes exactly the bucket, also after Redis
lost its scripts; a take pipelined beside an admission whose script Redis lacks runs once;
the bucket lives no longer than it takes to fill; a request refused before its items were
queued gets its tokens back, one whose items were queued does not; ``replica`` scope keeps a
bucket per replica, as in-process."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.api.client_rate import ClientRate
from service.api.errors import ApiError
from service.config import Settings
from service.queueing.redis_client_counts import SCRIPTS, RedisClientCounts
from service.queueing.redis_keys import client_in_flight_key, client_rate_key
from service.queueing.redis_queue import RedisQueue
from tests.redis_backend.helpers import two_replicas, wait_for
from tests.redis_backend.test_redis_client_quota import AnswerDropper
from tests.service_support import (
    GatedRunner,
    LiveServer,
    live_server,
    metric_value,
    post_polarity,
    read_metrics,
)

POL = "polarity-en"
ALICE, BOB = "alice-global-rate-key-0123", "bob-global-rate-key-456789"
OWN = "this client's rate in NLPSERVE_API_KEYS_FILE"


def write_keys(path: Path, rate: str = "rate=0.1 burst=2") -> Path:
    path.write_text(f"alice {ALICE} {rate}\nbob {BOB}\n")  # bob: no rate limit
    return path


def rate_of(srv: LiveServer) -> ClientRate:
    r = srv.state.client_rate
    assert r is not None
    return r


def assert_refused(r: httpx.Response, wait: tuple[int, int], spelled: str) -> None:
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "client_rate"
    assert wait[0] <= int(r.headers["retry-after"]) <= wait[1], r.headers["retry-after"]
    message = r.json()["error"]["message"]
    assert f"this client may send {spelled} across the API replicas ({OWN})" in message
    assert "alice" not in message


@pytest.fixture
def settings(make_settings, tmp_path: Path) -> Settings:
    return make_settings(api_keys_file=write_keys(tmp_path / "keys"), load_models=POL)


async def test_replicas_take_from_one_bucket(settings, tiny_runners, admin) -> None:
    bucket = client_rate_key(settings.redis_prefix, "alice")
    async with two_replicas(settings, {POL: tiny_runners[POL]}) as (a, b, ca, cb):
        assert rate_of(a).shared is not None
        assert (await post_polarity(ca, ALICE)).status_code == 200
        assert (await post_polarity(cb, ALICE)).status_code == 200  # the burst: 2, on either
        for c in (ca, cb):  # empty on both: an item every 10 s
            r = await post_polarity(c, ALICE)
            assert_refused(r, (9, 10), "0.1 items a second, 2 at most at once")
            assert r.json()["error"]["limit"] == {"name": "rate", "value": 0.1}
        # a client without a rate: no bucket
        assert (await post_polarity(ca, BOB)).status_code == 200
        assert not await admin.exists(client_rate_key(settings.redis_prefix, "bob"))
        # the bucket lives until it would be full (20 s): an idle client leaves nothing
        assert 0 < await admin.ttl(bucket) <= 21
        # more than the burst: 422 at once, from the replica's own copy of the rate
        r = await post_polarity(cb, ALICE, 3)
        assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_items"
        assert "may send at most 2 at once across the API replicas" in r.text
        assert r.json()["error"]["limit"] == {"name": "burst", "value": 2}

        # 10 s pass (as the bucket sees them): one item, on whichever replica asks first
        await admin.hset(bucket, "last", float(await admin.hget(bucket, "last")) - 10)
        assert (await post_polarity(cb, ALICE)).status_code == 200
        assert_refused(
            await post_polarity(ca, ALICE), (9, 10), "0.1 items a second, 2 at most at once"
        )

        for c in (ca, cb):
            text = await read_metrics(c)
            assert metric_value(text, "nlpserve_client_rate", client="alice") == 0.1
            refused = "nlpserve_client_rate_rejections_total"
            assert metric_value(text, refused, client="alice") == (1 if c is cb else 2)


async def test_a_reload_changes_the_rate_on_every_replica(settings, tiny_runners) -> None:
    assert settings.api_keys_file is not None
    async with two_replicas(settings, {POL: tiny_runners[POL]}) as (a, b, ca, cb):
        assert (await post_polarity(ca, ALICE, 2)).status_code == 200
        write_keys(settings.api_keys_file, "rate=0.1 burst=5")  # a bigger burst, same rate
        for srv in (a, b):
            assert srv.state.api_keys is not None and srv.state.api_keys.reload()
        # 3 items fit the new burst (not 422), and the empty bucket needs 30 s for them
        for c in (ca, cb):
            spelled = "0.1 items a second, 5 at most at once"
            assert_refused(await post_polarity(c, ALICE, 3), (29, 30), spelled)
        write_keys(settings.api_keys_file, "")  # no rate of its own, and no default: unlimited
        for srv in (a, b):
            assert srv.state.api_keys is not None and srv.state.api_keys.reload()
        assert (await post_polarity(cb, ALICE, 3)).status_code == 200


async def test_a_burst_on_both_replicas_takes_exactly_the_bucket(settings, admin) -> None:
    """Takes of one moment share a pipeline (the script still runs once per request, so two
    replicas' bursts take exactly the tokens there are), also after Redis lost its scripts
    (NOSCRIPT: loaded again, the burst sent again)."""
    bucket = client_rate_key(settings.redis_prefix, "alice")
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(live_server(settings))
        b = await stack.enter_async_context(live_server(settings))
        for flushed in (False, True):
            await admin.delete(bucket)
            if flushed:
                await admin.script_flush()
            takes = [rate_of(srv).take("alice", 1) for srv in (a, b) * 10]
            results = await asyncio.gather(*takes, return_exceptions=True)
            refused = [r for r in results if r is not None]
            assert len(refused) == len(results) - 2, (flushed, results)
            assert all(isinstance(e, ApiError) and e.code == "client_rate" for e in refused)
            assert float(await admin.hget(bucket, "tokens")) < 1


async def test_a_take_beside_an_admission_whose_script_redis_lacks_takes_once(
    settings, admin
) -> None:
    """Redis may hold the take's script and not the admission's: a take sent alone (loading
    only its own) first after Redis lost its scripts, or on the first replica of a rollout
    to the release that brought both (no older replica loaded either). A pipeline with a take
    and an admission then runs the take and answers NOSCRIPT to the admission: only the
    admission is sent again. Sent again whole, the take ran twice: two tokens gone for one
    request, and with the last one it was refused 429 by its own first run."""
    bucket = client_rate_key(settings.redis_prefix, "alice")
    async with live_server(settings) as srv:
        shared = rate_of(srv).shared
        assert isinstance(shared, RedisClientCounts)
        await admin.script_flush()
        assert await shared.take("alice", 1, 0.1, 2) == (True, 2.0)  # loads the take's only
        took, admitted = await asyncio.gather(
            shared.take("alice", 1, 0.1, 2),
            shared.acquire("bob", "one", 1, 5, time.monotonic() + 5),
        )
        assert took[0], took
        assert took[1] == pytest.approx(1, abs=0.01)
        assert admitted == (True, 0)
        assert float(await admin.hget(bucket, "tokens")) == pytest.approx(0, abs=0.01)
        await shared.release("bob", "one", 1, time.monotonic() + 5)
        assert not await admin.exists(client_in_flight_key(settings.redis_prefix, "bob"))


async def test_replica_scope_keeps_a_bucket_per_replica(
    make_settings, tiny_runners, admin, tmp_path
) -> None:
    settings = make_settings(
        api_keys_file=write_keys(tmp_path / "keys"), load_models=POL, client_quota_scope="replica"
    )
    async with two_replicas(settings, {POL: tiny_runners[POL]}) as (a, b, ca, cb):
        assert rate_of(a).shared is None
        assert (await post_polarity(ca, ALICE, 2)).status_code == 200
        r = await post_polarity(ca, ALICE)
        assert r.status_code == 429 and "across" not in r.json()["error"]["message"]
        assert (await post_polarity(cb, ALICE, 2)).status_code == 200  # B's own bucket
        assert not await admin.exists(client_rate_key(settings.redis_prefix, "alice"))


async def test_tokens_come_back_unless_the_items_were_queued(
    make_settings, tiny_runners, admin, tmp_path
) -> None:
    """The rate limit shares out model time. A request that ends before its items are
    queued (refused by the queue after its tokens were taken) used none: its tokens come
    back, and the client's next request at the burst passes (it was refused 429 client_rate,
    its tokens spent on nothing). Once its entries are in the streams a worker may run them
    and the replica cannot tell: a request that then ends (504 here, its entry held by a
    worker) keeps them spent."""
    settings = make_settings(
        max_batch_size=1,
        inference_threads=1,
        prefetch_batches=1,
        max_queue_depth=2,
        api_keys_file=write_keys(tmp_path / "keys"),
        load_models=POL,
    )
    gated = GatedRunner(tiny_runners[POL])
    bucket = client_rate_key(settings.redis_prefix, "alice")
    spelled = "0.1 items a second, 2 at most at once"
    async with two_replicas(settings, {POL: gated}) as (a, b, ca, cb):
        try:
            r = await post_polarity(ca, ALICE, 2, deadline_ms=500)  # queued, never answered
            assert r.status_code == 504, r.text
            assert_refused(await post_polarity(cb, ALICE), (9, 10), spelled)  # kept spent

            await admin.hset(bucket, "last", float(await admin.hget(bucket, "last")) - 30)
            # Alice's entries deleted (in the background after her 504), and A's view of the
            # streams read after that: a health probe that read them just before sees a full
            # queue for up to its interval, and Bob's requests were refused (seen under load)
            queue = a.state.queue
            assert isinstance(queue, RedisQueue)
            streams = queue._streams[POL]

            async def deleted() -> bool:
                return sum([await admin.xlen(s) for s in streams]) == 0

            await wait_for(deleted)  # fails here, saying so, if they never are
            await queue._sample_depths()
            assert queue.depth(POL) == 0
            held = [post_polarity(ca, BOB), post_polarity(ca, BOB)]  # the queue full
            await wait_for(lambda: queue.depth(POL) == 2)
            r = await post_polarity(ca, ALICE, 2)
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full", r.text
            assert float(await admin.hget(bucket, "tokens")) == pytest.approx(2, abs=0.01)
        finally:
            gated.gate.set()
        answers = [await t for t in held]
        assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
        # the burst (on A: B last saw the queue full, and would refuse it for that)
        r = await post_polarity(ca, ALICE, 2)
        assert r.status_code == 200, r.text

        # a bucket that is absent is full: a refund makes none
        shared = rate_of(a).shared
        assert isinstance(shared, RedisClientCounts)
        await shared.refund("bob", 1, 0.1, 2)
        assert not await admin.exists(client_rate_key(settings.redis_prefix, "bob"))


async def test_a_take_whose_request_gave_up_gives_its_tokens_back(settings, admin) -> None:
    """A request cancelled (its client gone) while its take is asked, at any point: not sent,
    in flight, or answered before the request resumed. A take that ran for nobody gives its
    tokens back (they were spent: the request's items never run); one whose answer the
    request read is the request's, as any other."""
    bucket = client_rate_key(settings.redis_prefix, "alice")

    async def full() -> bool:
        tokens = await admin.hget(bucket, "tokens")
        return tokens is None or float(tokens) == pytest.approx(2, abs=0.01)

    async with live_server(settings) as srv:
        shared = rate_of(srv).shared
        assert isinstance(shared, RedisClientCounts)
        for turns in range(10):
            take = asyncio.create_task(shared.take("alice", 2, 0.1, 2))
            for _ in range(turns):
                await asyncio.sleep(0)
            take.cancel()
            [result] = await asyncio.gather(take, return_exceptions=True)
            if not isinstance(result, BaseException):
                assert result[0], (turns, result)  # answered: the request's to refund
                await shared.refund("alice", 2, 0.1, 2)
            await wait_for(full)

        # cancelled once the answer came, before the request resumed
        run, takes = shared._pipeline._run, list[asyncio.Task[tuple[bool, float]]]()

        async def answered_then_cancelled(batch: list[Any]) -> list[Any]:
            results = await run(batch)
            asyncio.get_running_loop().call_soon(lambda: [t.cancel() for t in takes])
            return results

        shared._pipeline._run = answered_then_cancelled
        takes.append(asyncio.create_task(shared.take("alice", 2, 0.1, 2)))
        [result] = await asyncio.gather(*takes, return_exceptions=True)
        assert isinstance(result, asyncio.CancelledError), result
        shared._pipeline._run = run
        await wait_for(full)


async def test_a_take_or_a_refund_sent_again_after_its_answer_was_lost_runs_once(
    make_settings, redis_url, admin, tmp_path
) -> None:
    """redis-py sends a script again when its answer does not come (``Retry`` in
    make_client), though it may have run: a take then took twice (the client charged 2n, a
    429 too soon) and a refund gave back twice. Each runs once: the second run finds the
    first's id and changes nothing."""
    proxy = AnswerDropper(redis_url)
    async with proxy as url:
        settings = make_settings(
            redis_url=url,
            api_keys_file=write_keys(tmp_path / "keys"),
            load_models=POL,
            redis_socket_timeout_s=0.3,
        )
        bucket = client_rate_key(settings.redis_prefix, "alice")

        async def tokens() -> float:
            return float(await admin.hget(bucket, "tokens"))

        async with live_server(settings) as srv:
            shared = rate_of(srv).shared
            assert isinstance(shared, RedisClientCounts)
            for lua in SCRIPTS.values():
                await admin.script_load(lua)
            proxy.drop = 1
            assert (await shared.take("alice", 3, 0.001, 5))[0]  # taken, not a 429
            assert proxy.drop == 0  # its answer was lost, the retry's came
            assert await tokens() == pytest.approx(2, abs=0.01)
            proxy.drop = 1
            await shared.refund("alice", 1, 0.001, 5)
            assert proxy.drop == 0
            assert await tokens() == pytest.approx(3, abs=0.01)
            # other requests' takes and refunds still count, each once
            assert (await shared.take("alice", 1, 0.001, 5))[0]
            await shared.refund("alice", 2, 0.001, 5)
            assert await tokens() == pytest.approx(4, abs=0.01)

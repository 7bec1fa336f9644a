"""A replica's reply channel lost while requests wait (service/queueing/reply_loss.py):
the requests whose work Redis still holds are served, the others answered 503 at once.

Real redis-server (its own, restarted), the API-side queue and a worker on the test's loop.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import redis.asyncio as aioredis

from service.batching import WorkItem
from service.config import Settings
from service.queueing import BackendUnavailableError
from service.queueing.redis_queue import RedisQueue
from service.queueing.reply_loss import LOST
from service.runtime.runner import ModelRunner
from tests.redis_backend.helpers import (
    api_queue,
    assert_same,
    direct,
    make_item,
    running_worker,
    wait_for,
)
from tests.redis_support import RedisServer

POL = "polarity-en"


Outputs = dict[str, np.ndarray]


async def _queued(
    q: RedisQueue, runners: dict[str, ModelRunner], n: int, seed: int
) -> tuple[list[WorkItem], list[asyncio.Task[Outputs]]]:
    """``n`` requests waiting in Redis (no worker runs yet), their deadlines a minute away:
    a 504 at the deadline cannot come before the tests' 30-s waits end."""
    rng = np.random.default_rng(seed)
    items = [make_item(runners[POL], k, rng, deadline_s=60) for k in range(3, 3 + n)]
    tasks = [asyncio.create_task(q.submit(it)) for it in items]
    await wait_for(lambda: q.depth(POL) == n)
    return items, tasks


async def _served(
    settings: Settings,
    runners: dict[str, ModelRunner],
    items: list[WorkItem],
    tasks: list[asyncio.Task[Outputs]],
) -> None:
    async with running_worker(settings, runners):
        got = await asyncio.wait_for(asyncio.gather(*tasks), 30)
    for it, g in zip(items, got, strict=True):
        assert_same(g, direct(runners[POL], it))


async def test_a_killed_reply_subscription_loses_no_request(
    make_settings, tiny_runners, own_redis: RedisServer
) -> None:
    """CLIENT KILL TYPE pubsub (an operator, a proxy, a network blip) drops the replica's
    reply subscription, not the work: every request waiting was answered 503 at once and its
    work deleted, though the replies were still to come."""
    settings = make_settings(redis_url=own_redis.url)
    admin = aioredis.from_url(own_redis.url)
    try:
        async with api_queue(settings, tiny_runners) as q:
            items, tasks = await _queued(q, tiny_runners, 4, seed=1)
            assert await admin.client_kill_filter(_type="pubsub") >= 1
            await wait_for(lambda: q.stats["reconnects"] == 1 and q._subscribed)
            await asyncio.sleep(0.6)  # past the checks: the entries are still there
            assert not any(t.done() for t in tasks)
            await _served(settings, tiny_runners, items, tasks)
    finally:
        await admin.aclose()


async def test_a_redis_restart_with_persistence_loses_no_request(
    make_settings, tiny_runners, own_redis: RedisServer
) -> None:
    """With AOF on, the entries survive the restart: their requests keep waiting and are
    served once a worker reads them (they were answered 503 at the restart)."""
    own_redis.stop()
    own_redis.extra_args = ["--appendonly", "yes", "--appendfsync", "always"]
    own_redis.start()
    settings = make_settings(redis_url=own_redis.url)
    async with api_queue(settings, tiny_runners) as q:
        items, tasks = await _queued(q, tiny_runners, 4, seed=2)
        own_redis.stop()  # SIGKILL: every write was fsynced
        own_redis.start()
        await wait_for(lambda: q.stats["reconnects"] == 1 and q._subscribed, timeout=10)
        await asyncio.sleep(0.6)
        assert not any(t.done() for t in tasks)
        await _served(settings, tiny_runners, items, tasks)


async def test_requests_whose_work_redis_lost_are_answered_503_once_it_is_back(
    make_settings, tiny_runners, own_redis: RedisServer
) -> None:
    """Without persistence the restarted Redis is empty: the requests waiting are answered
    a retryable 503 saying so, as soon as the replica can tell, not at their deadline."""
    settings = make_settings(redis_url=own_redis.url)
    async with api_queue(settings, tiny_runners) as q:
        _, tasks = await _queued(q, tiny_runners, 3, seed=3)
        own_redis.stop()
        own_redis.start()
        # answered 503 "lost", not a 504 at their deadline (60 s away)
        done, _ = await asyncio.wait(tasks, timeout=30)
        assert len(done) == 3
        for t in tasks:
            with pytest.raises(BackendUnavailableError, match="lost this request's work") as lost:
                t.result()
            assert lost.value.status_code == 503
        assert LOST in str(tasks[0].exception())


async def test_requests_wait_no_longer_than_the_grace_for_redis_to_return(
    make_settings, tiny_runners, own_redis: RedisServer
) -> None:
    settings = make_settings(redis_url=own_redis.url)
    async with api_queue(settings, tiny_runners) as q:
        q._reply_loss.grace_s = 0.5
        _, tasks = await _queued(q, tiny_runners, 2, seed=4)
        own_redis.stop()  # and it stays away
        done, _ = await asyncio.wait(tasks, timeout=30)
        assert len(done) == 2
        for t in tasks:
            with pytest.raises(BackendUnavailableError, match="lost this request's work"):
                t.result()


async def test_a_user_without_xrange_gets_every_waiting_request_answered_503(
    make_settings, tiny_runners, own_redis: RedisServer, caplog
) -> None:
    """An ACL rule written before the check (no +xrange): the requests waiting when the
    subscription drops are all answered 503, as before, with a warning naming the fix."""
    admin = aioredis.from_url(own_redis.url)
    try:
        await admin.execute_command(
            "ACL", "SETUSER", "older", "on", ">pw", "~*", "&*", "+@all", "-xrange"
        )
        url = own_redis.url.replace("redis://", "redis://older:pw@")
        async with api_queue(make_settings(redis_url=url), tiny_runners) as q:
            _, tasks = await _queued(q, tiny_runners, 2, seed=5)
            await admin.client_kill_filter(_type="pubsub")
            done, _ = await asyncio.wait(tasks, timeout=30)
            assert len(done) == 2
            for t in tasks:
                with pytest.raises(BackendUnavailableError, match="lost this request's work"):
                    t.result()
    finally:
        await admin.aclose()
    assert "add +xrange to the rule" in caplog.text

"""RedisQueue (API side) + Worker against a real Redis server and real tiny models.

The worker runs on the test's event loop here (ORT on its executor thread); the
multi-process tests live in test_redis_processes.py.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis

from service.batching import WorkItem, bucket_index
from service.batching.types import REACH, Reach
from service.config import Settings
from service.loop_lag import INTERVAL_S
from service.metrics import Metrics
from service.queueing import (
    BackendUnavailableError,
    DeadlineExceededError,
    InferenceFailedError,
    QueueFullError,
    codec,
)
from service.queueing.base import NoWorkersError
from service.queueing.redis_keys import (
    GROUP,
    WORKER_ALIVE_S,
    dead_letter_stream,
    decode_pace,
    encode_pace,
    layout,
    model_pace_key,
    model_workers_key,
    stream_labels,
    work_stream,
    workers_key,
)
from service.runtime.runner import ModelRunner
from service.worker import StreamItem, Worker
from tests.redis_backend.helpers import (
    api_queue,
    assert_same,
    direct,
    make_item,
    running_worker,
    wait_for,
)
from tests.service_support import (
    LOOP_STALL_S,
    GatedRunner,
    RunnerProxy,
    late_wakeups,
    metric_value,
    stall_loop,
)

POS, POL = "pos-en", "polarity-en"


def _layout(runner) -> str:
    return layout(runner.manifest.version, runner.buckets)


@pytest.fixture
async def r(redis_url: str):
    client = aioredis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_results_match_direct_inference(make_settings, tiny_runners, caplog) -> None:
    settings = make_settings()
    rng = np.random.default_rng(0)
    items = [
        make_item(tiny_runners[m], int(n), rng)
        for m, n in [(POS, rng.integers(1, 64)) for _ in range(30)]
        + [(POL, rng.integers(1, 32)) for _ in range(30)]
    ]
    want = [direct(tiny_runners[it.model], it) for it in items]
    async with api_queue(settings, tiny_runners) as q, running_worker(settings, tiny_runners) as w:
        got = await asyncio.gather(*(q.submit(it) for it in items))
        many = await q.submit_many(items[:5])
    for g, x in zip(got, want, strict=True):
        assert_same(g, x)
    for g, x in zip(many, want[:5], strict=True):
        assert_same(g, x)
    assert w.stats.replies == 65 and w.stats.dead_lettered == 0
    # the server's version was read and is one the worker supports (7.x here)
    assert w._version_checked and "older than 7.0" not in caplog.text


async def test_backlog_is_read_in_bulk_and_batched(make_settings, tiny_runners, r) -> None:
    """Work queued before any worker exists is served, in full batches of one bucket."""
    settings = make_settings(max_batch_size=8, max_wait_ms=1000)
    rng = np.random.default_rng(1)
    items = [make_item(tiny_runners[POS], 3, rng) for _ in range(20)]  # one bucket
    async with api_queue(settings, tiny_runners) as q:
        tasks = [asyncio.create_task(q.submit(it)) for it in items]
        stream = work_stream(
            settings.redis_prefix, POS, _layout(tiny_runners[POS]), items[0].bucket
        )
        await wait_for(lambda: _xlen_is(r, stream, 20))
        await wait_for(lambda: q.depth(POS) == 20)  # sampled by the health loop
        async with running_worker(settings, tiny_runners) as w:
            got = await asyncio.wait_for(asyncio.gather(*tasks), 20)
        # full batches although max_wait is 1 s: the backlog was read in one XREADGROUP
        assert sorted(w.stats.batch_sizes, reverse=True)[:2] == [8, 8]
        assert sum(w.stats.batch_sizes) == 20
    for it, g in zip(items, got, strict=True):
        assert_same(g, direct(tiny_runners[POS], it))
    # answered entries are acked AND deleted: the stream is empty, nothing pending
    assert await r.xlen(stream) == 0
    assert (await r.xpending(stream, GROUP))["pending"] == 0


@pytest.mark.parametrize("wait_when_idle", [False, True])
async def test_idle_worker_runs_a_lone_entry_at_once(
    make_settings, tiny_runners, r, wait_when_idle: bool
) -> None:
    """With a one-minute max wait, an idle worker still runs a lone entry at once (no
    company is coming); with ``wait_when_idle`` it holds it for company."""
    settings = make_settings(
        max_wait_ms=60_000, default_deadline_ms=600_000, wait_when_idle=wait_when_idle
    )
    rng = np.random.default_rng(3)
    it = make_item(tiny_runners[POS], 5, rng)
    async with api_queue(settings, tiny_runners) as q, running_worker(settings, tiny_runners) as w:
        task = asyncio.create_task(q.submit(it))
        if not wait_when_idle:
            assert_same(await asyncio.wait_for(task, 10), direct(tiny_runners[POS], it))
            assert list(w.stats.batch_sizes) == [1]
            return
        await wait_for(lambda: len(w._in_hand) == 1)
        await asyncio.sleep(0.2)  # the worker had its chances: still held, not run
        assert w.stats.batches == 0 and not task.done()
        # leaving the blocks stops the worker, which runs what it holds
    assert_same(await task, direct(tiny_runners[POS], it))


async def test_next_batch_runs_while_the_last_ones_replies_are_written(
    make_settings, tiny_runners, r, monkeypatch
) -> None:
    """A thread is free once its batch returns: with one thread and nothing formed ahead,
    the next batch runs while the previous batch's replies are still being written."""
    settings = make_settings(inference_threads=1, prefetch_batches=0)
    rng = np.random.default_rng(4)
    items = [make_item(tiny_runners[POS], 5, rng) for _ in range(2)]
    async with api_queue(settings, tiny_runners) as q, running_worker(settings, tiny_runners) as w:
        gate = asyncio.Event()
        settle = w._settle

        async def slow_settle(done):  # the reply pipeline, held until the gate opens
            await gate.wait()
            await settle(done)

        monkeypatch.setattr(w, "_settle", slow_settle)
        first = asyncio.create_task(q.submit(items[0]))
        await wait_for(lambda: w.stats.batches == 1)
        second = asyncio.create_task(q.submit(items[1]))
        await wait_for(lambda: w.stats.batches == 2)  # before: waited for the first's replies
        assert not first.done() and w.batches_in_flight == 2
        gate.set()
        got = await asyncio.gather(first, second)
    for it, g in zip(items, got, strict=True):
        assert_same(g, direct(tiny_runners[POS], it))


async def test_only_consumers_of_dead_workers_are_forgotten(make_settings, tiny_runners, r) -> None:
    """A consumer idle on a quiet stream may be a live worker (an empty read does not reset
    its idle time): while its worker beats in P:workers, it is never deleted."""
    settings = make_settings()
    stream = work_stream(settings.redis_prefix, POS, _layout(tiny_runners[POS]), 0)
    key = workers_key(settings.redis_prefix)
    async with (
        running_worker(settings, tiny_runners) as w1,
        running_worker(settings, tiny_runners) as w2,
    ):
        await wait_for(lambda: _beating(r, key, {w1.name, w2.name}))
        # "ghost": a worker gone long ago, whose last beat is still in the set
        await r.zadd(key, {"ghost": time.time() - WORKER_ALIVE_S - 1})
        for name in (w2.name, "ghost", "never-beat"):
            await r.xgroup_createconsumer(stream, GROUP, name)
        await asyncio.sleep(0.01)
        await w1._forget_dead_consumers(0)  # every consumer counts as idle long enough
        names = {c["name"].decode() for c in await r.xinfo_consumers(stream, GROUP)}
        assert w2.name in names and not names & {"ghost", "never-beat"}
    assert not await _beating(r, key, {w1.name}) and not await _beating(r, key, {w2.name})


async def test_paces_of_workers_gone_silent_are_forgotten(make_settings, tiny_runners, r) -> None:
    """A killed worker cannot withdraw its pace: the others delete it once it is older than
    WORKER_ALIVE_S (and anything unreadable), so the hash does not grow with restarts."""
    settings = make_settings()
    key = model_pace_key(settings.redis_prefix, POS, _layout(tiny_runners[POS]))
    await r.hset(key, "killed", encode_pace(0.01, 2, time.time() - WORKER_ALIVE_S - 1))
    await r.hset(key, "garbled", b"nan 1 0")
    await r.hset(key, "alive", encode_pace(0.01, 2, time.time()))
    async with running_worker(settings, tiny_runners) as w:
        await wait_for(lambda: w.connected)
        await w._forget_stale_paces()
        assert set(await r.hkeys(key)) == {b"alive"}


async def test_replicas_count_the_workers_alive(make_settings, tiny_runners, caplog) -> None:
    """The health probe counts the workers that beat (nlpserve_workers_alive, /readyz's
    ``workers``), and a replica left without any says so in its log."""
    settings = make_settings()
    metrics = Metrics()
    async with api_queue(settings, tiny_runners, metrics) as q:
        await wait_for(lambda: q.workers_alive == 0)
        # not at once: at startup and after a Redis restart the count is 0 for a moment
        assert "no live inference worker" not in caplog.text
        q.no_worker_grace_s = 0.0
        await wait_for(lambda: "no live inference worker" in caplog.text)
        async with (
            running_worker(settings, tiny_runners),
            running_worker(settings, tiny_runners),
        ):
            await wait_for(lambda: q.workers_alive == 2)
            assert metric_value(metrics.render().decode(), "nlpserve_workers_alive") == 2
        await wait_for(lambda: q.workers_alive == 0)  # a worker that stops leaves the set


async def test_no_worker_fail_fast_refuses_at_once_and_recovers(make_settings, tiny_runners):
    """NLPSERVE_REDIS_NO_WORKER_FAIL_S: with no worker alive, a request is refused at once
    (503 no_workers) instead of waiting for its deadline; once a worker beats, it is served.
    Unset (the default), requests are queued for a worker to come."""
    settings = make_settings(redis_no_worker_fail_s=0.0)
    rng = np.random.default_rng(3)
    runner = tiny_runners[POS]
    async with api_queue(settings, tiny_runners) as q:
        await wait_for(lambda: q.workers_alive == 0)
        # Refused at once: NoWorkersError is raised only before anything is queued; a request
        # queued for a worker that never comes would end in a 504 at its deadline instead.
        with pytest.raises(NoWorkersError, match="no inference worker has been alive") as e:
            await q.submit(make_item(runner, 5, rng))
        assert e.value.status_code == 503
        assert q.depth(POS) == 0  # nothing was queued
        async with running_worker(settings, tiny_runners):
            await wait_for(lambda: q.workers_alive == 1)
            assert q.no_workers_refusal() is None
            out = await q.submit(make_item(runner, 5, rng))
            assert out and all(isinstance(v, np.ndarray) for v in out.values())
    async with api_queue(make_settings(), tiny_runners) as q:
        await wait_for(lambda: q.workers_alive == 0)
        assert q.no_workers_refusal() is None  # the default: queue and wait


async def test_no_worker_fail_fast_over_http(make_settings) -> None:
    """The same through a replica: /readyz and a prediction answer 503 no_workers, with
    Retry-After, while no worker is alive; so do the V2 protocol's probes and inference, in
    its error shape."""
    from tests.service_support import live_server

    text = {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a short test"]}
    async with live_server(make_settings(redis_no_worker_fail_s=0.0)) as srv:
        async with srv.client() as c:
            queue = srv.state.queue
            assert queue is not None
            await wait_for(lambda: queue.workers_alive == 0)
            ready = await c.get("/readyz")
            r = await c.post("/v1/pos", json={"text": "a short test"})
            v2 = [
                await c.get("/v2/health/ready"),
                await c.get(f"/v2/models/{POS}/ready"),
                await c.post(f"/v2/models/{POS}/infer", json={"inputs": [text]}),
            ]
            live = await c.get("/v2/health/live")
        for answer in (ready, r, *v2):
            assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
        for answer in (ready, r):
            assert answer.json()["error"]["code"] == "no_workers"
        for answer in v2:
            assert "no inference worker has been alive" in answer.json()["error"]
        assert live.status_code == 200


def _as_version(runner, version: str):
    """The same weights, published as another version (what a rolled-out repository holds)."""
    other = copy.copy(runner)
    other.manifest = runner.manifest.model_copy(update={"version": version})
    return other


async def test_replica_and_worker_meet_only_on_the_same_model_version(
    make_settings, tiny_runners, caplog
) -> None:
    """A replica that loaded pos-en/2 must not be answered by a worker running pos-en/1
    (another vocabulary or other labels would answer wrongly, without an error): its work
    waits in version 2's streams, the replica says no worker serves that version (log,
    gauge, the opt-in 503), and a worker of version 2 serves it."""
    settings = make_settings(redis_no_worker_fail_s=0.5)
    metrics = Metrics()
    rng = np.random.default_rng(11)
    v1 = {POS: tiny_runners[POS]}
    v2 = {POS: _as_version(tiny_runners[POS], "2")}
    assert v1[POS].manifest.version != "2"
    async with (
        api_queue(settings, v2, metrics) as q,
        running_worker(settings, v1) as old,
    ):
        q.no_worker_grace_s = 0.0
        await wait_for(lambda: q.workers_alive == 1 and q.model_workers_alive == {POS: 0})
        await wait_for(lambda: "no inference worker serves pos-en/2 with buckets" in caplog.text)
        series = 'nlpserve_model_workers_alive{model="pos-en",version="2"}'
        assert f"{series} 0.0" in metrics.render().decode()
        with pytest.raises(NoWorkersError, match="serving pos-en/2 .* serving other models"):
            await wait_for(lambda: q.no_workers_refusal(POS) is not None, timeout=5)
            await q.submit(make_item(v2[POS], 5, rng))
        assert q.no_workers_refusal() is None  # a worker is alive: /readyz stays ready
        async with running_worker(settings, v2) as new:
            await wait_for(lambda: q.model_workers_alive == {POS: 1})
            assert f"{series} 1.0" in metrics.render().decode()
            item = make_item(v2[POS], 5, rng)
            assert_same(await q.submit(item), direct(tiny_runners[POS], item))
        assert new.stats.replies == 1 and old.stats.replies == 0


async def test_workers_split_by_model(make_settings, tiny_runners, r) -> None:
    """Workers that load different models (NLPSERVE_LOAD_MODELS) each serve their own; the
    replica counts them per model."""
    settings = make_settings()
    rng = np.random.default_rng(13)
    async with (
        api_queue(settings, tiny_runners) as q,
        running_worker(settings, {POS: tiny_runners[POS]}) as pos_worker,
        running_worker(settings, {POL: tiny_runners[POL]}) as pol_worker,
    ):
        await wait_for(lambda: q.workers_alive == 2 and q.model_workers_alive == {POS: 1, POL: 1})
        items = [make_item(tiny_runners[m], 4, rng) for m in (POS, POL, POS)]
        for got, it in zip(await q.submit_many(items), items, strict=True):
            assert_same(got, direct(tiny_runners[it.model], it))
        # a version's heartbeat set expires once nobody beats it (no key left per old version)
        key = model_workers_key(settings.redis_prefix, POS, _layout(tiny_runners[POS]))
        assert 0 < await r.ttl(key) <= 2 * WORKER_ALIVE_S
    assert (pos_worker.stats.replies, pol_worker.stats.replies) == (2, 1)


def test_model_absence_waits_its_grace_and_defers_to_the_global_one(make_settings, tiny_runners):
    """A per-model absence is logged and refused like the global one: not within the grace
    (after a Redis restart every heartbeat set is empty for a moment) or the limit, and not
    at all while no worker is alive (the global refusal says it then)."""
    from service.queueing.redis_queue import RedisQueue

    q = RedisQueue(
        make_settings(redis_no_worker_fail_s=30.0),
        {n: r.manifest for n, r in tiny_runners.items()},
    )
    q._count_workers(1, {POS: 0, POL: 1})
    assert q.no_workers_refusal(POS) is None  # within the 30 s limit
    unserved = q._unserved[POS]
    assert unserved.since is not None  # unserved since the count above
    unserved.since -= 31
    refusal = q.no_workers_refusal(POS)
    assert refusal is not None and "serving pos-en/" in refusal
    assert q.no_workers_refusal(POL) is None and q.no_workers_refusal() is None
    q._count_workers(0, {POS: 0, POL: 0})  # none alive at all
    assert q._no_workers.since is not None
    q._no_workers.since -= 31
    for model in (POS, POL, None):
        refusal = q.no_workers_refusal(model)
        assert refusal is not None and "no inference worker has been alive" in refusal
    q._count_workers(2, {POS: 1, POL: 1})
    assert all(q.no_workers_refusal(m) is None for m in (POS, POL, None))


async def test_replica_and_worker_with_other_bucket_edges_never_exchange_work(
    make_settings, tiny_runners, caplog
) -> None:
    """NLPSERVE_BUCKETS set on a replica and not on the workers: a sequence in a bucket index
    the workers do not have waited, unseen, for its 504. The edges are part of the layout:
    the replica reports that no worker serves its layout (log, gauge, opt-in 503)."""
    runner = tiny_runners[POS]
    assert len(runner.buckets) > 1
    other = make_settings(buckets={POS: [4, *runner.buckets]}, redis_no_worker_fail_s=0.5)
    rng = np.random.default_rng(14)
    async with (
        api_queue(other, {POS: runner}) as q,
        running_worker(make_settings(), {POS: runner}) as w,
    ):
        q.no_worker_grace_s = 0.0
        assert q._edges[POS] == [4, *runner.buckets] != runner.buckets
        await wait_for(lambda: q.workers_alive == 1 and q.model_workers_alive == {POS: 0})
        await wait_for(lambda: f"buckets {[4, *runner.buckets]}" in caplog.text)
        assert "refused (503 no_workers)" in caplog.text  # what happens to its requests
        await wait_for(lambda: q.no_workers_refusal(POS) is not None, timeout=5)
        with pytest.raises(NoWorkersError, match="versions or bucket edges"):
            await q.submit(make_item(runner, 5, rng))
    assert w.stats.replies == 0


async def test_work_waits_for_a_worker_of_its_version(make_settings, tiny_runners) -> None:
    """Without the opt-in refusal, work for a version no worker runs is never taken by a
    worker of another version: it waits, and is served once its version's worker comes."""
    settings = make_settings()
    rng = np.random.default_rng(12)
    v2 = {POS: _as_version(tiny_runners[POS], "2")}
    async with api_queue(settings, v2) as q:
        item = make_item(v2[POS], 6, rng)
        async with running_worker(settings, {POS: tiny_runners[POS]}) as old:
            pending = asyncio.ensure_future(q.submit(item))
            await wait_for(lambda: q.depth(POS) == 1)
            await asyncio.sleep(0.5)  # several read rounds of the old worker
            assert not pending.done() and old.stats.replies == 0
            async with running_worker(settings, v2):
                assert_same(await asyncio.wait_for(pending, 10), direct(tiny_runners[POS], item))


async def _beating(r, key: str, names: set[str]) -> bool:
    return all(s is not None for s in await r.zmscore(key, list(names)))


async def test_work_of_a_request_that_gave_up_is_dropped_where_it_waits(
    make_settings, tiny_runners, r
) -> None:
    """A client gone: the entries a worker already read, waiting there for their batch, are
    dropped and acked, not run (as the in-process queue skips them); unread ones were
    deleted from the stream already."""
    settings = make_settings(
        max_wait_ms=60_000, default_deadline_ms=600_000, wait_when_idle=True, max_batch_size=5
    )
    rng = np.random.default_rng(11)
    items = [make_item(tiny_runners[POS], 12, rng) for _ in range(4)]
    stream = work_stream(settings.redis_prefix, POS, _layout(tiny_runners[POS]), items[0].bucket)
    async with api_queue(settings, tiny_runners) as q, running_worker(settings, tiny_runners) as w:
        request = asyncio.create_task(q.submit_many(items))
        await wait_for(lambda: len(w._in_hand) == 4)  # read, held for company
        request.cancel()  # the client went away
        await asyncio.gather(request, return_exceptions=True)
        await wait_for(lambda: len(w._in_hand) == 0)
        assert w.stats.cancelled == 4 and w.stats.batches == 0
        assert (await r.xpending(stream, GROUP))["pending"] == 0 and await r.xlen(stream) == 0
        # the worker goes on serving (a full batch: it does not wait for company)
        more = [make_item(tiny_runners[POS], 12, rng) for _ in range(5)]
        got = await asyncio.wait_for(q.submit_many(more), 10)
    for it, g in zip(more, got, strict=True):
        assert_same(g, direct(tiny_runners[POS], it))


async def _xlen_is(r, stream: str, n: int) -> bool:
    return await r.xlen(stream) == n


async def test_queue_full_is_429_and_all_or_nothing(make_settings, tiny_runners, r) -> None:
    settings = make_settings(max_queue_depth=3)
    rng = np.random.default_rng(2)
    async with api_queue(settings, tiny_runners) as q:  # no worker: nothing drains
        waiting = [asyncio.create_task(q.submit(make_item(tiny_runners[POS], 4, rng)))]
        waiting.append(asyncio.create_task(q.submit(make_item(tiny_runners[POS], 40, rng))))
        await wait_for(lambda: q.depth(POS) == 2)
        with pytest.raises(QueueFullError) as e:  # 2 queued + 2 > 3: neither is admitted
            await q.submit_many([make_item(tiny_runners[POS], 4, rng) for _ in range(2)])
        assert e.value.status_code == 429 and e.value.retry_after_s > 0
        assert "has 2 sequences queued and this request needs 2 more (limit 3)" in str(e.value)
        waiting.append(asyncio.create_task(q.submit(make_item(tiny_runners[POS], 5, rng))))
        await wait_for(lambda: q.depth(POS) == 3)
        with pytest.raises(QueueFullError):
            await q.submit(make_item(tiny_runners[POS], 4, rng))
        # other models have their own limit
        waiting.append(asyncio.create_task(q.submit(make_item(tiny_runners[POL], 4, rng))))
        await wait_for(lambda: q.depth(POL) == 1)
        for t in waiting:
            t.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        # cancelled requests (client gone) delete their entries: no worker will run them
        await wait_for(lambda: _total_len(r, settings.redis_prefix, 0))


async def test_a_request_cancelled_at_any_point_of_its_admission_leaves_no_entry(
    make_settings, tiny_runners, r
) -> None:
    """Admissions are auto-pipelined (service/queueing/autopipeline.py): a request that gives
    up before its admission goes out is not sent, one that gives up while it is in flight
    has its XADDs undone, one admitted deletes its entries as it ends: whenever the client
    leaves, no entry stays for a worker to run. A burst of admissions shares a pipeline."""
    settings = make_settings()
    rng = np.random.default_rng(5)
    async with api_queue(settings, tiny_runners) as q:  # no worker: nothing drains
        for turns in range(10):
            items = [make_item(tiny_runners[POS], 4, rng) for _ in range(3)]
            tasks = [asyncio.create_task(q.submit(it)) for it in items]
            for _ in range(turns):
                await asyncio.sleep(0)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await wait_for(lambda: _total_len(r, settings.redis_prefix, 0))

        # cancelled once its answer came and before its task resumed (a client gone then):
        # the answer is lost to the request, which could not delete what it never learned
        pipeline = q._admitting
        run = pipeline._run
        tasks = []

        async def answered_then_cancelled(batch: list[Any]) -> list[Any]:
            results = await run(batch)
            # ahead of the wakeups that setting the results schedules
            asyncio.get_running_loop().call_soon(lambda: [t.cancel() for t in tasks])
            return results

        pipeline._run = answered_then_cancelled
        tasks += [asyncio.create_task(q.submit(make_item(tiny_runners[POS], 4, rng)))]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(e, asyncio.CancelledError) for e in results), results
        await wait_for(lambda: _total_len(r, settings.redis_prefix, 0))


async def test_workers_publish_their_pace_and_a_clean_stop_withdraws_it(
    make_settings, tiny_runners, r
) -> None:
    """A worker's seconds per sequence (its recent batches, timed on their thread) go out
    with its heartbeat; the replicas sum the live workers' rates into the model's pace."""
    settings = make_settings()
    rng = np.random.default_rng(11)
    key = model_pace_key(settings.redis_prefix, POS, _layout(tiny_runners[POS]))
    async with api_queue(settings, tiny_runners) as q:
        async with running_worker(settings, tiny_runners) as w:
            assert POS not in q._seq_s  # no batch ran anywhere: no estimate, no refusal
            await q.submit_many([make_item(tiny_runners[POS], 6, rng) for _ in range(3)])
            await wait_for(lambda: POS in q._seq_s, timeout=10)
            pace = decode_pace(await r.hget(key, w.name))
            assert pace is not None
            seq_s, threads, at = pace
            assert 0 < seq_s < 5 and threads == w._threads[POS] and abs(at - time.time()) < 10
            assert q._seq_s[POS] == pytest.approx(seq_s / threads, rel=0.5)
            assert POL not in q._seq_s  # per model: polarity ran nothing
        assert await r.hget(key, w.name) is None  # a clean stop withdraws it
        await wait_for(lambda: POS not in q._seq_s)


async def test_a_replicas_answered_work_is_not_ahead_of_its_next_request(
    make_settings, tiny_runners, monkeypatch
) -> None:
    """The depth a replica refuses from (before the admission script) was last seen at an
    admission or a health probe; entries it admitted and got answered are gone from the
    streams (the worker deletes each with its reply), so a client's next request is not
    refused for them. Before, a batch of 3 with a limit of 4 got 429 right after the
    previous batch of 3 was answered, until the next health probe."""
    settings = make_settings(max_queue_depth=4)
    rng = np.random.default_rng(13)
    async with api_queue(settings, tiny_runners) as q, running_worker(settings, tiny_runners):

        async def no_probe() -> None:  # only admissions update what q saw
            await asyncio.sleep(0)

        monkeypatch.setattr(q, "_sample_depths", no_probe)
        for _ in range(3):
            await q.submit_many([make_item(tiny_runners[POS], 6, rng) for _ in range(3)])
            assert q.refuse(POS, 3, time.monotonic() + 20) is None
            assert q.depth(POS) == 0 and q._lane_depth[POS]["predict"] == 0


async def test_work_ahead_longer_than_the_deadline_is_refused_up_front(
    make_settings, tiny_runners, r
) -> None:
    """As in-process: a request whose deadline is nearer than the work ahead of it takes at
    the workers' published pace is refused at once (429), not held until its 504."""
    settings = make_settings()
    rng = np.random.default_rng(12)
    key = model_pace_key(settings.redis_prefix, POS, _layout(tiny_runners[POS]))
    async with api_queue(settings, tiny_runners) as q:  # no worker runs: nothing drains
        # two workers' paces, as their heartbeats write them: 100 s per sequence on 1
        # thread and 2 threads (4 s); one silent past WORKER_ALIVE_S does not count
        await r.hset(key, "w1", encode_pace(100.0, 1, time.time()))
        await r.hset(key, "w2", encode_pace(100.0, 2, time.time()))
        await r.hset(key, "dead", encode_pace(0.001, 8, time.time() - 2 * WORKER_ALIVE_S))
        await r.hset(key, "garbled", b"fast")
        await wait_for(lambda: q._seq_s.get(POS) == pytest.approx(100.0 / 3))
        assert q.refuse(POS, 1, time.monotonic() + 1) is None  # nothing ahead: any deadline
        waiting = [
            asyncio.create_task(q.submit(make_item(tiny_runners[POS], 4, rng))) for _ in range(2)
        ]
        await wait_for(lambda: q.depth(POS) == 2)
        # 2 ahead + its own 1 at 33.3 s each: 100 s of work
        with pytest.raises(QueueFullError) as e:
            await q.submit(make_item(tiny_runners[POS], 4, rng, deadline_s=60))
        assert e.value.status_code == 429 and e.value.retry_after_s >= 66
        assert "has 2 sequences running or queued ahead of this request" in str(e.value)
        assert q.depth(POS) == 2  # nothing of it was queued
        waiting.append(
            asyncio.create_task(q.submit(make_item(tiny_runners[POS], 4, rng, deadline_s=130)))
        )
        await wait_for(lambda: q.depth(POS) == 3)
        # explanations queued are not ahead of a prediction; a prediction is of one
        for _ in range(3):
            extra = make_item(tiny_runners[POS], 4, rng, deadline_s=300)
            extra.lane = "explain"
            waiting.append(asyncio.create_task(q.submit(extra)))
        await wait_for(lambda: q.depth(POS) == 6)
        await wait_for(lambda: q._lane_depth.get(POS, {}).get("predict") == 3)
        assert q.refuse(POS, 1, time.monotonic() + 140) is None  # 3 predictions + 1 ahead
        assert q.refuse(POS, 1, time.monotonic() + 140, lane=None) is not None  # 6 + 1
        # batch-priority predictions: ahead of explanations and batch ones, not of interactive
        for _ in range(2):
            extra = make_item(tiny_runners[POS], 4, rng, deadline_s=300)
            extra.lane = "batch"
            waiting.append(asyncio.create_task(q.submit(extra)))
        await wait_for(lambda: q.depth(POS) == 8)
        assert q.refuse(POS, 1, time.monotonic() + 140) is None  # still 3 + 1
        assert q.refuse(POS, 1, time.monotonic() + 140, lane="batch") is not None  # 5 + 1
        assert q.refuse(POS, 1, time.monotonic() + 230, lane="batch") is None
        for t in waiting:
            t.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)


@pytest.mark.parametrize("prefix_tail", ["", ":blue:b7"], ids=["plain", "prefix-with-:b"])
async def test_queue_depth_gauges_per_bucket(
    make_settings, tiny_runners, redis_prefix, prefix_tail
) -> None:
    """Each submit refreshes the model's nlpserve_queue_depth per bucket from the admission
    script's stream lengths (predict and explain lanes summed), cluster-wide; the bucket
    label is read from the stream name whatever the key prefix holds (":b" too)."""
    settings = make_settings(redis_prefix=redis_prefix + prefix_tail)
    rng = np.random.default_rng(3)
    metrics = Metrics()
    runner = tiny_runners[POS]
    short, long = 4, runner.buckets[0] + 1  # the first bucket and the next one
    b_short, b_long = bucket_index(short, runner.buckets), bucket_index(long, runner.buckets)
    async with api_queue(settings, tiny_runners, metrics) as q:  # no worker: nothing drains
        waiting = [
            asyncio.create_task(q.submit(make_item(runner, n, rng))) for n in (short, short, long)
        ]
        await wait_for(lambda: q.depth(POS) == 3)
        # the last submit's admission saw all three entries
        waiting.append(asyncio.create_task(q.submit(make_item(runner, short, rng))))
        await wait_for(lambda: q.depth(POS) == 4)
        text = metrics.render().decode()
        for t in waiting:
            t.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
    depth = {
        b: metric_value(text, "nlpserve_queue_depth", model=POS, bucket=str(b))
        for b in (b_short, b_long)
    }
    assert depth == {b_short: 3, b_long: 1}
    assert "nlpserve_queue_depth{" in text and 'bucket="lue' not in text
    assert 'bucket="7' not in text  # from the prefix, not the stream's bucket


async def _total_len(r, prefix: str, n: int) -> bool:
    total = 0
    async for key in r.scan_iter(f"{prefix}:*"):
        if (await r.type(key)) == b"stream" and not key.endswith(b":dead"):
            total += await r.xlen(key)
    return total == n


async def test_deadline_expires_in_queue_and_worker_skips_it(make_settings, tiny_runners, r):
    settings = make_settings()
    rng = np.random.default_rng(3)
    async with api_queue(settings, tiny_runners) as q:
        t0 = time.monotonic()  # before the deadline is set: the bound below is safe under load
        with pytest.raises(DeadlineExceededError, match="not served before the request deadline"):
            # no worker yet: nobody answers; the 504 is the queue's own, at the deadline (an
            # unbounded wait would end in wait_for's TimeoutError, which is no such error)
            await asyncio.wait_for(
                q.submit(make_item(tiny_runners[POS], 6, rng, deadline_s=0.3)), 60
            )
        # not before the deadline: timers fire on time or late, so load cannot break this
        assert time.monotonic() - t0 >= 0.29
        # an expired entry that is still in the stream (the API could not delete it) is
        # skipped and acked by the worker, never run
        stale = make_item(tiny_runners[POS], 6, rng, deadline_s=-1.0)
        stream = work_stream(settings.redis_prefix, POS, _layout(tiny_runners[POS]), stale.bucket)
        await r.xadd(stream, codec.encode_work(stale, q.channel, offset=q.clock.offset))
        async with running_worker(settings, tiny_runners) as w:
            await wait_for(lambda: w.stats.expired == 1)
            fresh = make_item(tiny_runners[POS], 6, rng)
            assert_same(await q.submit(fresh), direct(tiny_runners[POS], fresh))
        assert w.stats.batches == 1 and w.stats.replies == 1
        assert await r.xlen(stream) == 0


async def test_late_and_duplicate_replies_are_dropped(make_settings, tiny_runners, r) -> None:
    settings = make_settings()
    async with api_queue(settings, tiny_runners) as q:
        await r.publish(q.channel, codec.encode_reply(codec.Reply("nobody-waits")))
        await r.publish(q.channel, b"garbage")
        await wait_for(lambda: q.stats["late_replies"] == 1 and q.stats["bad_replies"] == 1)
        assert await q.is_ready()


async def test_poison_input_goes_to_dead_letter_and_client_gets_error(
    make_settings, tiny_runners, r
) -> None:
    settings = make_settings(redis_max_attempts=3, max_wait_ms=20)
    rng = np.random.default_rng(4)
    bad = make_item(tiny_runners[POS], 7, rng, poison=True)
    good = [make_item(tiny_runners[POS], 7, rng) for _ in range(3)]
    async with api_queue(settings, tiny_runners) as q, running_worker(settings, tiny_runners) as w:
        calls = [q.submit(bad), *(q.submit(g) for g in good)]
        res = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(res[0], InferenceFailedError) and res[0].status_code == 422
    assert "dead-letter" in str(res[0]) and "3 attempt" in str(res[0])
    for g, out in zip(good, res[1:], strict=True):  # batch-mates of the poison are unharmed
        assert not isinstance(out, BaseException), out
        assert_same(out, direct(tiny_runners[POS], g))
    assert w.stats.retried == 2 and w.stats.dead_lettered == 1
    dead = await r.xrange(dead_letter_stream(settings.redis_prefix, POS))
    assert len(dead) == 1
    fields = dead[0][1]
    assert fields[b"dead_reason"] == b"failed" and b"Gather" in fields[b"dead_error"]
    assert fields[codec.F_ID] == bad.id.encode() and fields[codec.F_ATTEMPT] == b"3"
    # the dead-lettered entry still decodes: it can be inspected or replayed
    assert codec.decode_work(fields).item.length == 7


class _OutputsAs(RunnerProxy):
    """A runner whose outputs come back converted by ``convert`` (what another model's
    ONNX graph could return)."""

    def __init__(self, inner: ModelRunner, convert: Callable[[np.ndarray], np.ndarray]) -> None:
        super().__init__(inner)
        self.convert = convert

    def run_batch(
        self, items: Sequence[WorkItem], *, record: bool = True
    ) -> list[dict[str, np.ndarray]]:
        outs = self.inner.run_batch(items, record=record)
        return [{k: self.convert(v) for k, v in d.items()} for d in outs]


async def test_an_answer_the_codec_cannot_carry_fails_alone_and_never_jams_the_worker(
    make_settings, tiny_runners
) -> None:
    """The reply was encoded inside the settling pipeline: a CodecError ended the batch task
    with nothing answered or acked, and the entries held the worker's room for good."""
    settings = make_settings(worker_prefetch=4, redis_read_count=4, max_wait_ms=5)
    rng = np.random.default_rng(6)
    runners = {**tiny_runners, POL: _OutputsAs(tiny_runners[POL], lambda v: v.astype(str))}
    async with api_queue(settings, tiny_runners) as q, running_worker(settings, runners) as w:
        bad = [make_item(tiny_runners[POL], 5, rng, deadline_s=60) for _ in range(6)]
        res = await asyncio.gather(*(q.submit(it) for it in bad), return_exceptions=True)
        # answered, not left to the deadline (that would be DeadlineExceededError)
        assert all(isinstance(x, InferenceFailedError) for x in res), res
        assert "could not send the model's answer" in str(res[0])
        good = make_item(tiny_runners[POS], 5, rng, deadline_s=60)
        assert_same(await q.submit(good), direct(tiny_runners[POS], good))
        await wait_for(lambda: not w._in_hand)


async def test_unsigned_outputs_are_answered_as_in_process(make_settings, tiny_runners) -> None:
    settings = make_settings()
    rng = np.random.default_rng(7)
    to_u32 = _OutputsAs(tiny_runners[POL], lambda v: (np.abs(v) * 1000).astype(np.uint32))
    item = make_item(tiny_runners[POL], 5, rng)
    async with api_queue(settings, tiny_runners) as q, running_worker(settings, {POL: to_u32}):
        out = await q.submit(item)
    want = to_u32.run_batch([item])[0]
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in want.items()}
    assert all(np.array_equal(out[k], want[k]) for k in want)


async def test_a_command_redis_refuses_while_settling_is_not_resent_with_the_rest(
    make_settings, tiny_runners, r
) -> None:
    """The settling pipeline is no transaction: when Redis refused one command (here the
    dead letter: its key holds a string), the whole pipeline was sent again for 5 s,
    repeating the replies and acks that had gone through."""
    settings = make_settings(redis_max_attempts=1, max_wait_ms=5)
    rng = np.random.default_rng(8)
    bad = make_item(tiny_runners[POS], 7, rng, poison=True)
    await r.set(dead_letter_stream(settings.redis_prefix, POS), "not a stream")
    async with api_queue(settings, tiny_runners) as q, running_worker(settings, tiny_runners) as w:
        with pytest.raises(InferenceFailedError, match="dead-letter"):
            await q.submit(bad)
        await asyncio.sleep(0.6)  # a resent pipeline would publish the reply again by now
        assert q.stats["late_replies"] == 0
        await wait_for(lambda: not w._in_hand)
    assert w.stats.replies == 1


async def test_an_entry_with_a_nan_time_is_dead_lettered_not_blocking_its_bucket(
    make_settings, tiny_runners, r
) -> None:
    """A NaN deadline made its bucket's oldest wait NaN: the scheduler never picked that
    bucket again, and every later request of its length timed out."""
    settings = make_settings(max_wait_ms=5)
    rng = np.random.default_rng(9)
    runner = tiny_runners[POL]
    stream = work_stream(settings.redis_prefix, POL, _layout(runner), 0)
    async with api_queue(settings, tiny_runners) as q, running_worker(settings, tiny_runners) as w:
        poison = make_item(runner, 3, rng)
        fields = codec.encode_work(poison, reply_to="nobody")
        await wait_for(lambda: _has_group(r, stream))
        await r.xadd(stream, {**fields, codec.F_DEADLINE: b"nan"})
        good = make_item(runner, 3, rng, deadline_s=5)
        assert_same(await q.submit(good), direct(runner, good))
        await wait_for(lambda: w.stats.dead_lettered == 1)
    dead = await r.xrange(dead_letter_stream(settings.redis_prefix, POL))
    assert [f[b"dead_reason"] for _, f in dead] == [b"malformed"]


async def _has_group(r, stream: str) -> bool:
    try:
        return any(g["name"] == GROUP.encode() for g in await r.xinfo_groups(stream))
    except Exception:
        return False


async def _ghost_read(r, settings, stream: str, ghost: str = "ghost") -> list[bytes]:
    """A consumer that reads entries and dies without acking them."""
    await r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    resp = await r.xreadgroup(GROUP, ghost, {stream: ">"}, count=100)
    return [i for _, entries in resp for i, _ in entries]


@pytest.mark.parametrize("dead", ["ghost", "worker-a"], ids=["other-worker", "own-old-name"])
async def test_entries_of_a_dead_worker_are_reclaimed(
    make_settings, tiny_runners, r, dead: str
) -> None:
    """A dead consumer's pending entries are taken over after the claim idle time. With
    ``own-old-name`` the dead one is this worker's earlier life (a fixed NLPSERVE_WORKER_NAME,
    one per container): it owns them by name but does not hold them, so it takes them over."""
    settings = make_settings(redis_claim_idle_ms=300, worker_name="worker-a")
    rng = np.random.default_rng(5)
    items = [make_item(tiny_runners[POL], 9, rng) for _ in range(5)]
    stream = work_stream(settings.redis_prefix, POL, _layout(tiny_runners[POL]), items[0].bucket)
    async with api_queue(settings, tiny_runners) as q:
        tasks = [asyncio.create_task(q.submit(it)) for it in items]
        await wait_for(lambda: _xlen_is(r, stream, 5))
        assert len(await _ghost_read(r, settings, stream, dead)) == 5
        async with running_worker(settings, tiny_runners) as w:
            got = await asyncio.wait_for(asyncio.gather(*tasks), 15)
    for it, g in zip(items, got, strict=True):
        assert_same(g, direct(tiny_runners[POL], it))
    assert w.name == "worker-a" and w.stats.reclaimed == 5
    assert (await r.xpending(stream, GROUP))["pending"] == 0


async def test_entry_that_keeps_killing_workers_is_dead_lettered_once(
    make_settings, tiny_runners, r
) -> None:
    """Dead-lettered once: a worker that only stalled on it (ghost-1, woken up later) may
    give up on it too; it found the entry settled, but wrote a second dead letter."""
    settings = make_settings(redis_claim_idle_ms=200, redis_max_attempts=2)
    rng = np.random.default_rng(6)
    item = make_item(tiny_runners[POS], 5, rng)
    stream = work_stream(settings.redis_prefix, POS, _layout(tiny_runners[POS]), item.bucket)
    async with api_queue(settings, tiny_runners) as q:
        task = asyncio.create_task(q.submit(item))
        await wait_for(lambda: _xlen_is(r, stream, 1))
        (entry_id,) = await _ghost_read(r, settings, stream, "ghost-1")
        # a second worker took it over and died too: 2 deliveries, no answer
        await r.xclaim(stream, GROUP, "ghost-2", 0, [entry_id])
        async with running_worker(settings, tiny_runners) as w:
            with pytest.raises(InferenceFailedError, match="delivered 3 times"):
                await asyncio.wait_for(task, 10)
        fields = codec.encode_work(item, reply_to="gone")
        stalled = make_settings(redis_claim_idle_ms=200, worker_name="ghost-1")
        async with running_worker(stalled, tiny_runners) as ghost:
            await wait_for(lambda: _beating(r, workers_key(settings.redis_prefix), {"ghost-1"}))
            await ghost._settle([ghost._dead(stream, entry_id, fields, "boom", "failed")])
    assert w.stats.dead_lettered == 1 and w.stats.batches == 0
    assert ghost.stats.dead_lettered == 0
    (dead,) = await r.xrange(dead_letter_stream(settings.redis_prefix, POS))
    assert dead[1][b"dead_reason"] == b"redelivered" and dead[1][b"dead_entry"] == entry_id


async def test_a_worker_stopped_as_it_starts_still_ends(make_settings, tiny_runners) -> None:
    """A stop that came before the worker's loops got going (SIGTERM right after a start)
    left its maintenance and cancel loops running for good: the cancel that ends them was
    lost inside redis-py, and run() never returned."""
    w = Worker(make_settings(), tiny_runners)
    w.stop()
    task = asyncio.create_task(w.run())
    done, _ = await asyncio.wait({task}, timeout=30)
    assert done, "run() did not return after a stop"
    task.result()


async def test_live_worker_keeps_its_entries(make_settings, tiny_runners, r) -> None:
    """Entries held longer than the claim idle time are kept alive, not stolen."""
    # idle 400 ms: a worker refreshes its entries every third of it, so a stall of the
    # test's event loop (both workers run on it) shorter than ~250 ms cannot fail this
    settings = make_settings(
        redis_claim_idle_ms=400, max_wait_ms=2000, wait_when_idle=True, max_batch_size=64
    )
    rng = np.random.default_rng(7)
    async with (
        api_queue(settings, tiny_runners) as q,
        running_worker(settings, tiny_runners) as w1,
        running_worker(settings, tiny_runners) as w2,
    ):
        # each item waits ~2 s in a worker for its batch to fill: 5x the idle time
        items = [make_item(tiny_runners[POL], 4, rng) for _ in range(6)]
        got = await asyncio.gather(*(q.submit(it) for it in items))
    for it, g in zip(items, got, strict=True):
        assert_same(g, direct(tiny_runners[POL], it))
    assert w1.stats.reclaimed == 0 and w2.stats.reclaimed == 0
    assert w1.stats.replies + w2.stats.replies == 6


@pytest.mark.parametrize("own_reclaim", [False, True], ids=["plain", "after-own-reclaim"])
async def test_graceful_stop_finishes_work_in_hand(
    make_settings, tiny_runners, r, own_reclaim: bool
) -> None:
    """Work read and waiting for its batch runs, once, when the worker stops. With
    ``own_reclaim``: when a worker's keepalive runs late, its own reclaim sweep finds entries
    it already holds; they are neither taken over (no delivery counted, not counted as
    reclaimed) nor scheduled twice."""
    settings = make_settings(max_wait_ms=5000, wait_when_idle=True, max_batch_size=64)
    rng = np.random.default_rng(8)
    items = [make_item(tiny_runners[POS], 12, rng) for _ in range(4)]
    async with api_queue(settings, tiny_runners) as q:
        async with running_worker(settings, tiny_runners) as w:
            tasks = [asyncio.create_task(q.submit(it)) for it in items]
            await wait_for(lambda: len(w._in_hand) == 4)  # read, waiting for the batch to fill
            if own_reclaim:
                await w._reclaim(0)  # idle 0: every pending entry, all of them ours
                assert w.stats.reclaimed == 0 and len(w._in_hand) == 4
                rows = await r.xpending_range(
                    work_stream(
                        settings.redis_prefix,
                        POS,
                        _layout(tiny_runners[POS]),
                        items[0].bucket,
                    ),
                    GROUP,
                    "-",
                    "+",
                    10,
                )
                assert [x["times_delivered"] for x in rows] == [1] * 4
            # leaving the block stops the worker: it must run the 4 now, not drop them
        assert list(w.stats.batch_sizes) == [4]
        for it, g in zip(items, await asyncio.gather(*tasks), strict=True):
            assert_same(g, direct(tiny_runners[POS], it))
    stream = work_stream(settings.redis_prefix, POS, _layout(tiny_runners[POS]), items[0].bucket)
    assert (await r.xpending(stream, GROUP))["pending"] == 0


async def test_graceful_stop_runs_what_its_last_read_brings(make_settings, tiny_runners, r):
    """A worker told to stop while its XREADGROUP blocks: entries that read returns are its
    own (pending under its name) and must run before it leaves, not wait out the claim idle
    time for another worker (the batcher used to leave before the read came back)."""
    # A long block: the read is still waiting when the entry comes, however slow the machine.
    settings = make_settings(redis_block_ms=30_000)
    rng = np.random.default_rng(21)
    item = make_item(tiny_runners[POS], 5, rng, deadline_s=60)
    async with api_queue(settings, tiny_runners) as q:
        worker = Worker(settings, {POS: tiny_runners[POS]})
        run = asyncio.create_task(worker.run())
        await wait_for(lambda: worker.connected)
        await asyncio.sleep(0.3)  # inside its blocking read
        worker.stop()
        await asyncio.sleep(0.1)  # the old batcher had left by now
        # No other worker could reclaim it: left pending, it would never be answered.
        got = await asyncio.wait_for(q.submit(item), 30)
        await asyncio.wait_for(run, 10)
    assert_same(got, direct(tiny_runners[POS], item))
    # answered by the stopping worker itself, from its own read, not taken over
    assert worker.stats.replies == 1 and worker.stats.reclaimed == 0 and not worker._in_hand
    stream = work_stream(settings.redis_prefix, POS, _layout(tiny_runners[POS]), item.bucket)
    assert (await r.xpending(stream, GROUP))["pending"] == 0


async def test_graceful_stop_runs_what_a_reclaim_in_flight_brings(
    make_settings, tiny_runners, r, monkeypatch
):
    """The same for a reclaim sweep: entries a worker is taking over (XCLAIM in flight) when
    told to stop become its own; it must run them before it leaves."""
    settings = make_settings(redis_claim_idle_ms=300)
    rng = np.random.default_rng(22)
    item = make_item(tiny_runners[POS], 5, rng)
    stream = work_stream(settings.redis_prefix, POS, _layout(tiny_runners[POS]), item.bucket)
    await r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    async with api_queue(settings, tiny_runners) as q:
        pending = asyncio.ensure_future(q.submit(item))
        await wait_for(lambda: q.depth(POS) == 1)
        assert await r.xreadgroup(GROUP, "ghost", {stream: ">"}, count=10)  # a dead worker's
        worker = Worker(settings, {POS: tiny_runners[POS]})
        run = asyncio.create_task(worker.run())
        await wait_for(lambda: worker.connected)
        called, go = asyncio.Event(), asyncio.Event()
        xclaim = worker.client.xclaim

        async def held_xclaim(*a, **k):
            called.set()
            await go.wait()
            return await xclaim(*a, **k)

        monkeypatch.setattr(worker.client, "xclaim", held_xclaim)
        await asyncio.wait_for(called.wait(), 5)
        worker.stop()
        await asyncio.sleep(0.3)  # reader done: the old batcher had left by now
        go.set()
        got = await asyncio.wait_for(pending, 5)
        await asyncio.wait_for(run, 10)
    assert_same(got, direct(tiny_runners[POS], item))
    assert worker.stats.reclaimed == 1 and worker.stats.replies == 1
    assert (await r.xpending(stream, GROUP))["pending"] == 0


def test_rare_event_series_exist_at_zero_from_the_start(make_settings, tiny_runners) -> None:
    """The alerts on reclaims and dead letters use increase(): a series born at its first
    event (1) shows no increase, so every model's series is there at 0 before any event."""
    from service.worker import DEAD_LETTER_REASONS

    body = Worker(make_settings(), tiny_runners).metrics.render().decode()
    for model in tiny_runners:
        assert f'nlpserve_worker_reclaimed_total{{model="{model}"}} 0.0' in body
        for reason in DEAD_LETTER_REASONS:
            series = f'nlpserve_worker_dead_lettered_total{{model="{model}",reason="{reason}"}}'
            assert f"{series} 0.0" in body


async def test_worker_metrics_and_health_endpoint(make_settings, tiny_runners) -> None:
    settings = make_settings()
    rng = np.random.default_rng(9)
    async with api_queue(settings, tiny_runners) as q, running_worker(settings, tiny_runners) as w:
        port = w.start_http(0)
        try:
            items = [make_item(tiny_runners[POS], 5, rng) for _ in range(3)]
            await asyncio.gather(*(q.submit(it) for it in items))
            await asyncio.sleep(1.2)  # one stream sample
            body = await asyncio.to_thread(_get, port, "/metrics")
            assert await asyncio.to_thread(_get, port, "/healthz") == b"ok\n"
            assert await asyncio.to_thread(_get, port, "/readyz") == b"ready\n"
            w._stopping = True  # draining: no longer ready, and the body says so
            with pytest.raises(urllib.error.HTTPError) as e:
                await asyncio.to_thread(_get, port, "/readyz")
            assert e.value.code == 503 and e.value.read() == b"not ready\n"
            w._stopping = False
            with pytest.raises(SystemExit, match=f"cannot serve /metrics on .*:{port} "):
                w.start_http(port)  # taken (by itself here): one line, no traceback
        finally:
            w.stop_http()
    text = body.decode()
    for name in (
        "nlpserve_batch_size_count",
        "nlpserve_padding_efficiency_bucket",
        "nlpserve_worker_reclaimed_total",
        "nlpserve_worker_dead_lettered_total",
        "nlpserve_worker_stream_lag_entries",
        "nlpserve_worker_stream_pending_entries",
        "nlpserve_worker_replies_total",
    ):
        assert name in text, name
    assert 'nlpserve_worker_replies_total{model="pos-en",status="ok"} 3.0' in text
    # a stream's series say which version's streams they sample (two run during a rollout)
    from prometheus_client.parser import text_string_to_metric_families

    lag = {
        tuple(sorted(s.labels.items())): s.value
        for f in text_string_to_metric_families(text)
        if f.name == "nlpserve_worker_stream_lag_entries"
        for s in f.samples
    }
    version = tiny_runners[POS].manifest.version
    labels = {"model": POS, "version": version, "bucket": "0", "lane": "predict"}
    assert lag[tuple(sorted(labels.items()))] == 0.0


async def test_worker_exports_its_event_loop_lag(make_settings, tiny_runners) -> None:
    """The worker's loop reads, replies and reclaims: its lag is on its metrics port, and a
    scrape (served by a thread) shows a loop stuck right now, before the loop can record it."""
    lag_tasks = {t for t in asyncio.all_tasks() if t.get_name() == "event-loop-lag"}
    async with running_worker(make_settings(), tiny_runners) as w:
        port = w.start_http(0)
        try:

            async def read() -> str:
                return (await asyncio.to_thread(_get, port, "/metrics")).decode()

            before, after = await stall_loop(read)
            count = "nlpserve_event_loop_lag_seconds_count"
            assert metric_value(after, count) > metric_value(before, count)
            assert metric_value(after, "nlpserve_event_loop_lag_max_seconds") >= (
                LOOP_STALL_S - INTERVAL_S
            )
            # stuck: this loop waits (blocked) for the HTTP thread's scrape
            stalled, scraped = threading.Event(), threading.Event()

            def scrape_while_stalled() -> str:
                stalled.wait()
                time.sleep(2 * LOOP_STALL_S)
                try:
                    return _get(port, "/metrics").decode()
                finally:
                    scraped.set()

            before = await read()
            scrape = asyncio.get_running_loop().run_in_executor(None, scrape_while_stalled)
            stalled.set()
            assert scraped.wait(timeout=30)
            during = await scrape
            assert late_wakeups(during) == late_wakeups(before)  # the monitor could not run
            assert metric_value(during, "nlpserve_event_loop_lag_max_seconds") >= (
                2 * LOOP_STALL_S - INTERVAL_S
            )
        finally:
            w.stop_http()
    # run() stopped its monitor: none is left pending on the loop
    assert not {t for t in asyncio.all_tasks() if t.get_name() == "event-loop-lag"} - lag_tasks


def test_worker_refuses_a_taken_metrics_port_before_loading_models(make_settings) -> None:
    """Two workers on one host share the default port: the second says so in one line at
    once, not with a traceback after loading every model."""
    import socket

    from service.worker import run_worker

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        settings = make_settings(metrics_port=port, metrics_host="127.0.0.1")
        settings = settings.model_copy(update={"model_dir": Path("/nonexistent")})
        with pytest.raises(SystemExit, match=f"127.0.0.1:{port} .*--metrics-port"):
            run_worker(settings)  # the models folder does not exist: never reached


def _get(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return resp.read()


async def test_redis_out_of_memory_is_a_clear_503(make_settings, tiny_runners, own_redis):
    """At maxmemory (noeviction) Redis refuses the admission script's writes: the client is
    told so, without Redis' script internals, and is served once memory is back."""
    settings = make_settings(redis_url=own_redis.url)
    rng = np.random.default_rng(15)
    admin = aioredis.from_url(own_redis.url)
    try:
        async with api_queue(settings, tiny_runners) as q:
            await admin.config_set("maxmemory-policy", "noeviction")
            await admin.config_set("maxmemory", "1")
            with pytest.raises(BackendUnavailableError) as e:
                await q.submit(make_item(tiny_runners[POS], 5, rng))
            msg = str(e.value)
            assert "out of memory" in msg and "retry later" in msg
            assert "script" not in msg and "@" not in msg, msg
            await admin.config_set("maxmemory", "0")
            async with running_worker(settings, tiny_runners):
                it = make_item(tiny_runners[POS], 5, rng)
                assert_same(await q.submit(it), direct(tiny_runners[POS], it))
    finally:
        await admin.aclose()


async def test_an_admission_redis_refuses_leaves_its_request_unreached(
    make_settings, tiny_runners, own_redis
):
    """An error reply (out of memory here; an ACL refusal, a read-only replica alike) means
    the admission script did not run: nothing was queued, so the request's items never
    reached a model (its tokens come back, service/api/client_quota.py ``admit``), as when
    the script refuses for depth. One queued is reached, whatever comes of it."""
    settings = make_settings(redis_url=own_redis.url)
    rng = np.random.default_rng(17)
    admin = aioredis.from_url(own_redis.url)

    def reached_item() -> tuple[WorkItem, Reach]:
        reach = Reach()
        mark = REACH.set(reach)
        try:
            return make_item(tiny_runners[POS], 5, rng), reach
        finally:
            REACH.reset(mark)

    try:
        async with api_queue(settings, tiny_runners) as q:
            await _out_of_memory(admin)
            item, reach = reached_item()
            with pytest.raises(BackendUnavailableError, match="out of memory"):
                await q.submit(item)
            assert not reach.reached
            await admin.config_set("maxmemory", "0")
            async with running_worker(settings, tiny_runners):
                item, reach = reached_item()
                await q.submit(item)
                assert reach.reached
    finally:
        await admin.aclose()


async def _out_of_memory(admin) -> None:
    await admin.config_set("maxmemory-policy", "noeviction")
    await admin.config_set("maxmemory", "1")


async def test_a_worker_started_while_redis_is_out_of_memory_drains_the_queue(
    make_settings, tiny_runners, own_redis
):
    """At maxmemory Redis refuses XGROUP CREATE even for a group that exists, but not the
    reads, replies and acks a worker needs: a worker started then (a restart, or scaled out
    because the queue filled the memory) serves what was queued instead of retrying the
    group's creation until memory frees."""
    settings = make_settings(redis_url=own_redis.url)
    rng = np.random.default_rng(16)
    admin = aioredis.from_url(own_redis.url)
    try:
        async with api_queue(settings, tiny_runners) as q:
            async with running_worker(settings, tiny_runners) as w:  # creates the groups
                await wait_for(lambda: w.connected)
            items = [make_item(tiny_runners[POL], n, rng) for n in (3, 9, 30)]
            tasks = [asyncio.create_task(q.submit(it)) for it in items]
            await wait_for(lambda: q.depth(POL) == 3)
            await _out_of_memory(admin)
            async with running_worker(settings, tiny_runners):
                got = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    finally:
        await admin.config_set("maxmemory", "0")
        await admin.aclose()
    for it, g in zip(items, got, strict=True):
        assert_same(g, direct(tiny_runners[POL], it))


async def test_a_worker_reclaims_while_redis_is_out_of_memory(
    make_settings, tiny_runners, own_redis
):
    """At maxmemory Redis refuses a worker's heartbeat (ZADD, HSET), not XPENDING or XCLAIM:
    the refused beat ended every maintenance pass, so a dead worker's entries waited for
    memory to free (their clients for a 504) and live entries went unrefreshed."""
    settings = make_settings(redis_url=own_redis.url, redis_claim_idle_ms=300)
    rng = np.random.default_rng(17)
    items = [make_item(tiny_runners[POL], 9, rng) for _ in range(4)]
    stream = work_stream(settings.redis_prefix, POL, _layout(tiny_runners[POL]), items[0].bucket)
    admin = aioredis.from_url(own_redis.url)
    try:
        async with api_queue(settings, tiny_runners) as q:
            tasks = [asyncio.create_task(q.submit(it)) for it in items]
            await wait_for(lambda: q.depth(POL) == 4)
            assert len(await _ghost_read(admin, settings, stream)) == 4  # and dies
            await _out_of_memory(admin)
            async with running_worker(settings, tiny_runners) as w:
                got = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    finally:
        await admin.config_set("maxmemory", "0")
        await admin.aclose()
    for it, g in zip(items, got, strict=True):
        assert_same(g, direct(tiny_runners[POL], it))
    assert w.stats.reclaimed == 4


async def test_redis_restart_readiness_and_recovery(make_settings, tiny_runners, own_redis):
    settings = make_settings(redis_url=own_redis.url)
    rng = np.random.default_rng(10)
    async with api_queue(settings, tiny_runners) as q, running_worker(settings, tiny_runners) as w:
        it = make_item(tiny_runners[POS], 5, rng)
        assert_same(await q.submit(it), direct(tiny_runners[POS], it))

        own_redis.stop()
        await wait_for(lambda: not q._ready, timeout=3)
        assert not await q.is_ready()
        with pytest.raises(BackendUnavailableError) as e:
            await q.submit(make_item(tiny_runners[POS], 5, rng))
        # refused at once by the readiness check: not a failed round trip to Redis (its
        # message adds the connection error) nor a wait for the deadline (504)
        assert e.value.status_code == 503
        assert str(e.value) == "the queue backend (Redis) is unreachable", str(e.value)
        await wait_for(lambda: not w.connected, timeout=5)

        own_redis.start()  # empty: streams and groups are gone, workers recreate them
        await wait_for(q.is_ready, timeout=10)
        await wait_for(lambda: w.connected, timeout=10)
        for n in (3, 20, 40):
            it = make_item(tiny_runners[POS], n, rng)
            got = await asyncio.wait_for(q.submit(it), 10)
            assert_same(got, direct(tiny_runners[POS], it))
    assert q.stats["reconnects"] >= 1


@pytest.mark.parametrize("prefetch", [0, 1])
async def test_worker_queues_prefetch_batches_behind_the_running_one(
    make_settings, tiny_runners, prefetch
) -> None:
    gated = {POL: GatedRunner(tiny_runners[POL])}
    settings = make_settings(max_batch_size=1, inference_threads=1, prefetch_batches=prefetch)
    rng = np.random.default_rng(5)
    items = [make_item(tiny_runners[POL], 4, rng) for _ in range(3)]
    async with api_queue(settings, gated) as q, running_worker(settings, gated) as w:
        tasks = [asyncio.create_task(q.submit(it)) for it in items]
        try:
            await wait_for(lambda: gated[POL].active == 1 and w.batches_in_flight == 1 + prefetch)
        finally:
            gated[POL].gate.set()
        got = await asyncio.wait_for(asyncio.gather(*tasks), 20)
    assert gated[POL].most == 1  # one thread: never two batches running at once
    for it, g in zip(items, got, strict=True):
        assert_same(g, direct(tiny_runners[POL], it))


async def test_worker_never_forms_an_explanation_ahead(make_settings, tiny_runners) -> None:
    """As in-process: with every thread busy, a prediction may queue ahead, an explanation
    may not, so a later prediction runs before it."""
    gated = {POL: GatedRunner(tiny_runners[POL])}
    settings = make_settings(max_batch_size=1, inference_threads=1, prefetch_batches=1)
    rng = np.random.default_rng(6)
    first, later = (make_item(tiny_runners[POL], n, rng) for n in (3, 5))
    explain = dataclasses.replace(make_item(tiny_runners[POL], 4, rng), lane="explain")
    async with api_queue(settings, gated) as q, running_worker(settings, gated) as w:
        tasks = [asyncio.create_task(q.submit(first))]
        try:
            await wait_for(lambda: gated[POL].active == 1)
            tasks.append(asyncio.create_task(q.submit(explain)))
            await wait_for(lambda: len(w.schedulers[POL]) == 1)  # read, waiting in the worker
            await asyncio.sleep(0.05)  # the batch loop had its chances: still not formed
            assert w.batches_in_flight == 1
            tasks.append(asyncio.create_task(q.submit(later)))
            await wait_for(lambda: w.batches_in_flight == 2)
            assert len(w.schedulers[POL]) == 1
        finally:
            gated[POL].gate.set()
        got = await asyncio.wait_for(asyncio.gather(*tasks), 20)
    assert gated[POL].started == [(3,), (5,), (4,)]
    for it, g in zip((first, explain, later), got, strict=True):
        assert_same(g, direct(tiny_runners[POL], it))


async def test_worker_runs_batch_priority_work_after_interactive_before_explanations(
    make_settings, tiny_runners, r
) -> None:
    """Each lane in its own stream (``...:batch``): with the thread busy, an explanation and
    a batch-priority prediction read first still run after a later interactive one, and the
    batch one before the explanation."""
    gated = {POL: GatedRunner(tiny_runners[POL])}
    settings = make_settings(max_batch_size=1, inference_threads=1, prefetch_batches=1)
    rng = np.random.default_rng(8)
    first, later = (make_item(tiny_runners[POL], n, rng) for n in (3, 5))
    explain = dataclasses.replace(make_item(tiny_runners[POL], 6, rng), lane="explain")
    batch = dataclasses.replace(make_item(tiny_runners[POL], 4, rng), lane="batch")
    async with api_queue(settings, gated) as q, running_worker(settings, gated) as w:
        tasks = [asyncio.create_task(q.submit(first))]
        try:
            await wait_for(lambda: gated[POL].active == 1)
            tasks.append(asyncio.create_task(q.submit(explain)))
            tasks.append(asyncio.create_task(q.submit(batch)))
            await wait_for(lambda: len(w.schedulers[POL]) == 2)  # read, waiting in the worker
            assert w.schedulers[POL].depth(lane="batch") == 1
            streams = {s.decode() if isinstance(s, bytes) else s async for s in r.scan_iter("*")}
            assert any(s.endswith(":batch") for s in streams)
            tasks.append(asyncio.create_task(q.submit(later)))
            await wait_for(lambda: w.batches_in_flight == 2)
        finally:
            gated[POL].gate.set()
        got = await asyncio.wait_for(asyncio.gather(*tasks), 20)
    assert gated[POL].started == [(3,), (5,), (4,), (6,)]
    for it, g in zip((first, explain, batch, later), got, strict=True):
        assert_same(g, direct(tiny_runners[POL], it))


async def test_a_starved_batch_priority_item_ends_at_its_deadline(
    make_settings, tiny_runners
) -> None:
    """While interactive work holds the model, a batch-priority item waits up to its own
    deadline, then DeadlineExceededError (504), and never runs."""
    gated = {POL: GatedRunner(tiny_runners[POL])}
    settings = make_settings(max_batch_size=1, inference_threads=1, prefetch_batches=1)
    rng = np.random.default_rng(9)
    first = make_item(tiny_runners[POL], 3, rng)
    starved = make_item(tiny_runners[POL], 7, rng, deadline_s=0.5)
    starved.lane = "batch"
    async with api_queue(settings, gated) as q, running_worker(settings, gated):
        running = asyncio.create_task(q.submit(first))
        try:
            await wait_for(lambda: gated[POL].active == 1)
            with pytest.raises(DeadlineExceededError):
                await q.submit(starved)
        finally:
            gated[POL].gate.set()
        await asyncio.wait_for(running, 20)
    assert (7,) not in gated[POL].started


async def test_batch_work_goes_to_the_predict_lane_while_a_live_worker_does_not_read_it(
    make_settings, tiny_runners, caplog
) -> None:
    """Mixed versions: a worker of the version before the batch lane reads only the predict
    and explain streams. While one is alive, a replica queues batch-priority work in the
    predict lane, where it is served (it waited to its deadline, 504, in a ``...:batch``
    stream nobody read); with only workers that read the batch lane, it has its own again."""
    caplog.set_level(logging.INFO, "service.queueing.redis_queue")
    settings = make_settings()
    rng = np.random.default_rng(10)
    item = make_item(tiny_runners[POL], 5, rng, deadline_s=3.0)
    item.lane = "batch"
    async with api_queue(settings, tiny_runners) as q:
        async with (
            running_worker(settings, tiny_runners, lanes=("predict", "explain")) as old,
            running_worker(settings, tiny_runners) as new,
        ):
            await wait_for(lambda: q.model_workers_alive.get(POL) == 2)
            assert not q._lane_read(POL, "batch")
            await wait_for(lambda: "batch-priority work goes to its predict lane" in caplog.text)
            assert_same(await q.submit(item), direct(tiny_runners[POL], item))
            assert old.stats.replies + new.stats.replies == 1
            assert q._lane_read(POL, "predict") and q._lane_read(POL, "explain")
        async with running_worker(settings, tiny_runners) as new:
            await wait_for(lambda: q.model_workers_alive.get(POL) == 1)
            await wait_for(lambda: q._lane_read(POL, "batch"))
            await wait_for(lambda: "work goes to its batch lane: every live" in caplog.text)
            again = make_item(tiny_runners[POL], 5, rng, deadline_s=3.0)
            again.lane = "batch"
            assert_same(await q.submit(again), direct(tiny_runners[POL], again))
            assert new.stats.replies == 1


async def test_a_worker_of_the_version_before_the_batch_lane_serves_batch_work(
    make_settings, tiny_runners
) -> None:
    """Rolled out API first: the only worker is of the earlier version. Batch work still
    runs (in the predict lane), not a 504 at its deadline."""
    settings = make_settings()
    rng = np.random.default_rng(13)
    item = make_item(tiny_runners[POL], 6, rng, deadline_s=2.0)
    item.lane = "batch"
    async with (
        api_queue(settings, tiny_runners) as q,
        running_worker(settings, tiny_runners, lanes=("predict", "explain")) as old,
    ):
        await wait_for(lambda: q.model_workers_alive.get(POL) == 1)
        assert_same(await q.submit(item), direct(tiny_runners[POL], item))
        assert old.stats.replies == 1


async def test_worker_skips_what_was_cancelled_while_its_batch_was_formed_ahead(
    make_settings, tiny_runners, r
) -> None:
    """A cancel notice dropped only entries still in the scheduler: one whose batch was
    formed ahead (queued behind the running batch) still ran, for nobody."""
    gated = {POL: GatedRunner(tiny_runners[POL])}
    settings = make_settings(max_batch_size=1, inference_threads=1, prefetch_batches=1)
    rng = np.random.default_rng(17)
    first, left = (make_item(tiny_runners[POL], n, rng) for n in (3, 7))
    async with api_queue(settings, gated) as q, running_worker(settings, gated) as w:
        running = asyncio.create_task(q.submit(first))
        try:
            await wait_for(lambda: gated[POL].active == 1)
            gone = asyncio.create_task(q.submit(left))
            await wait_for(lambda: w.batches_in_flight == 2)  # formed ahead, behind `first`
            gone.cancel()
            await wait_for(lambda: any(it.cancelled for it in w._in_hand.values()))
        finally:
            gated[POL].gate.set()
        assert_same(await running, direct(tiny_runners[POL], first))
        await wait_for(lambda: w.batches_in_flight == 0)
    assert gated[POL].started == [(3,)]  # the cancelled entry never ran
    assert w.stats.cancelled == 1 and w.stats.replies == 1


async def test_worker_skips_what_expired_while_its_batch_was_formed_ahead(
    make_settings, tiny_runners, r
) -> None:
    """As in-process: a batch formed ahead queues behind the running one; an entry of it
    that expired meanwhile is acked, counted as expired and never run."""
    gated = {POL: GatedRunner(tiny_runners[POL])}
    settings = make_settings(max_batch_size=1, inference_threads=1, prefetch_batches=1)
    rng = np.random.default_rng(7)
    first, doomed, fresh = (make_item(tiny_runners[POL], n, rng) for n in (3, 7, 4))
    async with api_queue(settings, gated) as q, running_worker(settings, gated) as w:
        running = asyncio.create_task(q.submit(first))
        try:
            await wait_for(lambda: gated[POL].active == 1)
            # from now: its batch must form (queued behind `first`) before it expires
            doomed.deadline = time.monotonic() + 1.0
            late = asyncio.create_task(q.submit(doomed))
            await wait_for(lambda: w.batches_in_flight == 2)  # formed ahead, behind `first`
            with pytest.raises(DeadlineExceededError):
                await late
        finally:
            gated[POL].gate.set()
        assert_same(await running, direct(tiny_runners[POL], first))
        await wait_for(lambda: w.batches_in_flight == 0)
        assert gated[POL].started == [(3,)]  # the expired entry never ran
        assert w.stats.expired == 1
        assert_same(await q.submit(fresh), direct(tiny_runners[POL], fresh))
    assert w.stats.batches == 2 and w.stats.replies == 2


async def test_worker_runs_a_model_while_another_holds_its_threads(
    make_settings, tiny_runners
) -> None:
    """One worker, two models: pos-en's batch holds its thread, another is formed ahead and
    more wait; a polarity entry meanwhile runs at once, on a thread of its own. With one
    executor and one count of batches for every model, pos-en's took every place and the
    polarity entry waited for them to end."""
    gated = {POS: GatedRunner(tiny_runners[POS]), POL: tiny_runners[POL]}
    settings = make_settings(max_batch_size=1, inference_threads=1, prefetch_batches=1)
    rng = np.random.default_rng(23)
    flood = [make_item(tiny_runners[POS], n, rng) for n in (3, 4, 5, 6)]
    light = make_item(tiny_runners[POL], 4, rng)
    async with api_queue(settings, gated) as q, running_worker(settings, gated) as w:
        tasks = [asyncio.create_task(q.submit(it)) for it in flood]
        try:
            await wait_for(
                lambda: (
                    gated[POS].active == 1
                    and w.batches_in_flight == 2
                    and len(w.schedulers[POS]) == 2
                )
            )
            answer = asyncio.create_task(q.submit(light))
            await wait_for(answer.done, timeout=5)  # pos-en's gate is still shut
            assert_same(answer.result(), direct(tiny_runners[POL], light))
            assert gated[POS].active == 1 and not any(t.done() for t in tasks)
        finally:
            gated[POS].gate.set()
        got = await asyncio.wait_for(asyncio.gather(*tasks), 20)
    assert gated[POS].most == 1  # pos-en itself still ran one batch at a time
    for it, g in zip(flood, got, strict=True):
        assert_same(g, direct(tiny_runners[POS], it))


async def test_a_model_holding_all_the_worker_may_hold_does_not_stop_reading_the_others(
    make_settings, tiny_runners
) -> None:
    """``worker_prefetch`` counts per model: pos-en holds all it may (its batches wait at a
    gate, more of its entries wait in Redis), and a polarity entry is still read and
    answered. Counted over all models, the worker stopped reading until pos-en's work ended."""
    gated = {POS: GatedRunner(tiny_runners[POS]), POL: tiny_runners[POL]}
    settings = make_settings(
        max_batch_size=1,
        inference_threads=1,
        prefetch_batches=1,
        worker_prefetch=2,
        redis_read_count=2,
    )
    rng = np.random.default_rng(29)
    flood = [make_item(tiny_runners[POS], n, rng) for n in range(3, 9)]
    light = make_item(tiny_runners[POL], 4, rng)

    def held(model: str) -> int:
        return sum(1 for it in w._in_hand.values() if it.model == model)

    async with api_queue(settings, gated) as q, running_worker(settings, gated) as w:
        tasks = [asyncio.create_task(q.submit(it)) for it in flood]
        try:
            await wait_for(lambda: gated[POS].active == 1 and held(POS) == 2)
            answer = asyncio.create_task(q.submit(light))
            await wait_for(answer.done, timeout=5)  # pos-en's gate is still shut
            assert_same(answer.result(), direct(tiny_runners[POL], light))
            assert held(POS) == 2 and not any(t.done() for t in tasks)  # no more read
        finally:
            gated[POS].gate.set()
        got = await asyncio.wait_for(asyncio.gather(*tasks), 20)
    for it, g in zip(flood, got, strict=True):
        assert_same(g, direct(tiny_runners[POS], it))


Reads = list[tuple[set[tuple[str, str]], int, int | None]]


def recorded_reads(w: Worker, then: Callable[[int | None], Awaitable[None]]) -> Reads:
    """Put in ``w`` a stand-in for Redis that records each XREADGROUP (its streams' (model,
    lane), COUNT, BLOCK) and, after ``then(block)``, answers none; the groups exist and the
    worker is connected (only its first read would not block)."""
    reads: Reads = []

    class Client:
        async def xreadgroup(self, group, name, streams, count, block):
            reads.append(({stream_labels(s)[::3] for s in streams}, count, block))
            await then(block)
            return []

    async def groups_exist() -> None:
        pass

    w.client = Client()  # type: ignore[assignment]
    w._ensure_groups = groups_exist  # type: ignore[method-assign]  # no server to ask
    w._room, w._wake = asyncio.Event(), asyncio.Event()
    w.connected = True
    return reads


async def test_a_read_asks_no_more_of_each_stream_than_the_fullest_model_may_take(
    tiny_repo, tiny_runners
) -> None:
    """XREADGROUP's COUNT applies to each stream read. pos-en with room for one more entry
    and polarity with room for four: the read asks one entry per stream, so pos-en ends at
    most one entry per stream over its limit; asked for polarity's room, it got up to four
    per stream. Once pos-en is at its limit it is left out and polarity gets its own room.
    Batch-priority entries at the limit leave out only pos-en's batch and explain streams:
    its interactive ones have a room of their own."""
    settings = Settings(
        model_dir=tiny_repo, queue="redis", worker_prefetch=4, redis_read_count=64, warmup=False
    )
    w = Worker(settings, tiny_runners)

    async def stop(block: int | None) -> None:
        w._stopping = True  # one read per _read_until_stopped

    reads = recorded_reads(w, stop)
    pos_streams = {stream_labels(s)[3]: s for s in w.streams if w._stream_model[s] == POS}
    for held, lane in ((3, "predict"), (4, "predict"), (4, "batch")):
        w._in_hand = {
            (pos_streams[lane], str(k).encode()): StreamItem(
                model=POS, bucket=0, length=1, features={}, deadline=0.0, lane=lane
            )
            for k in range(held)
        }
        w._stopping = False
        await w._read_until_stopped()
    every = {(m, lane) for m in (POS, POL) for lane in ("predict", "batch", "explain")}
    assert reads == [
        (every, 1, settings.redis_block_ms),
        # pos-en left out; a short block, to read it again once it has room
        ({(POL, lane) for lane in ("predict", "batch", "explain")}, 4, 50),
        (every - {(POS, "batch"), (POS, "explain")}, 4, 50),
    ]


async def test_streams_left_out_for_lack_of_room_are_read_as_soon_as_a_settle_frees_some(
    tiny_repo, tiny_runners
) -> None:
    """pos-en's batch entries fill its prefetch: the blocked read takes in its interactive
    streams (and polarity's) only. An answered batch frees room: its batch and explain
    streams are read at once, without blocking (the blocked read holds its connection), not
    when the blocked read ends."""
    settings = Settings(
        model_dir=tiny_repo, queue="redis", worker_prefetch=4, redis_read_count=64, warmup=False
    )
    w = Worker(settings, tiny_runners)
    unblock = asyncio.Event()

    async def blocks(block: int | None) -> None:
        if block is not None:
            await unblock.wait()

    reads = recorded_reads(w, blocks)
    batch = next(s for s in w.streams if stream_labels(s)[::3] == (POS, "batch"))
    w._in_hand = {
        (batch, str(k).encode()): StreamItem(
            model=POS, bucket=0, length=1, features={}, deadline=0.0, lane="batch"
        )
        for k in range(4)
    }
    reader = asyncio.create_task(w._read_until_stopped())
    try:
        await wait_for(lambda: len(reads) == 1)
        lower = {(POS, "batch"), (POS, "explain")}
        every = {(m, lane) for m in (POS, POL) for lane in ("predict", "batch", "explain")}
        assert reads[0] == (every - lower, 4, 50)
        w._in_hand.popitem()  # a batch of one answered (_settle)
        w._room.set()
        await wait_for(lambda: len(reads) == 2)
        assert reads[1] == (lower, 1, None)
        assert not reader.done()  # still in the blocked read
    finally:
        w._stopping = True
        w._room.set()
        unblock.set()
        await asyncio.wait_for(reader, 5)


async def test_a_url_socket_timeout_still_outlasts_the_workers_blocked_read(
    make_settings, tiny_runners, redis_url, caplog
) -> None:
    """``?socket_timeout=0.2`` in NLPSERVE_REDIS_URL (it wins over the settings' default): the
    worker's reads block for 500 ms, and its read timeout is the URL's plus that, so an idle
    worker stays connected. Taken as the whole timeout, every idle read timed out and the
    worker logged Redis unreachable."""
    settings = make_settings(redis_url=f"{redis_url}?socket_timeout=0.2", redis_block_ms=500)
    rng = np.random.default_rng(31)
    item = make_item(tiny_runners[POL], 4, rng)
    async with api_queue(settings, tiny_runners) as q, running_worker(settings, tiny_runners) as w:
        await asyncio.sleep(1.5)  # idle: each read blocks its whole 500 ms
        assert w.connected and "unreachable" not in caplog.text
        assert_same(await q.submit(item), direct(tiny_runners[POL], item))

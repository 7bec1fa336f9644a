"""Helpers of the Redis backend tests: a worker on the test's loop, an API-side queue, two
API replicas, work items with random (in-vocabulary) token ids."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import httpx
import numpy as np

from service.batching import WorkItem, bucket_index
from service.config import Settings
from service.metrics import Metrics
from service.queueing.redis_queue import RedisQueue
from service.runtime.runner import ModelRunner
from service.worker import Worker
from tests.service_support import LiveServer, live_server


@contextlib.asynccontextmanager
async def running_worker(
    settings: Settings, runners: Mapping[str, ModelRunner], lanes: tuple[str, ...] | None = None
) -> AsyncIterator[Worker]:
    """A worker on this event loop (ORT on its executor thread), stopped gracefully after
    (``lanes``: only those lanes' streams read, as a worker of an earlier version)."""
    worker = Worker(settings, runners) if lanes is None else Worker(settings, runners, lanes=lanes)
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        try:
            await asyncio.wait_for(task, timeout=15)
        except TimeoutError:
            task.cancel()
            raise


@contextlib.asynccontextmanager
async def two_replicas(
    settings: Settings, runners: Mapping[str, ModelRunner] | None
) -> AsyncIterator[tuple[LiveServer, LiveServer, httpx.AsyncClient, httpx.AsyncClient]]:
    """A worker of ``runners`` (None: none) and two API replicas (uvicorn) of ``settings``
    sharing its Redis: (replica A, replica B, a client of A, a client of B)."""
    async with contextlib.AsyncExitStack() as stack:
        if runners is not None:
            await stack.enter_async_context(running_worker(settings, runners))
        a = await stack.enter_async_context(live_server(settings))
        b = await stack.enter_async_context(live_server(settings))
        ca = await stack.enter_async_context(a.client())
        cb = await stack.enter_async_context(b.client())
        yield a, b, ca, cb


@contextlib.asynccontextmanager
async def api_queue(
    settings: Settings, runners: Mapping[str, ModelRunner], metrics: Metrics | None = None
) -> AsyncIterator[RedisQueue]:
    q = RedisQueue(settings, {n: r.manifest for n, r in runners.items()}, metrics)
    await q.start()
    assert await q.is_ready()
    try:
        yield q
    finally:
        await q.close(drain_timeout_s=1.0)


def make_item(
    runner: ModelRunner,
    length: int,
    rng: np.random.Generator,
    *,
    deadline_s: float = 20.0,
    poison: bool = False,
) -> WorkItem:
    """A sequence of ``length`` random small ids (inside every tiny vocabulary)."""
    bucket = bucket_index(length, runner.buckets)
    item = runner.dummy_item(length, bucket)
    for name, arr in item.features.items():
        item.features[name] = rng.integers(2, 12, size=arr.shape).astype(arr.dtype)
    if poison:  # out-of-vocabulary ids make ORT's Gather fail: a deterministic bad input
        item.features["word_ids"] = item.features["word_ids"] + 10**9
    item.deadline = time.monotonic() + deadline_s
    return item


def direct(runner: ModelRunner, item: WorkItem) -> dict[str, np.ndarray]:
    """The reference: the item run alone, in this process."""
    return runner.run_batch([item], record=False)[0]


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].shape == want[k].shape, k
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5)


async def wait_for(cond: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll ``cond`` until true; fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        res = cond()
        if not isinstance(res, bool):
            res = await res
        if res:
            return
        if time.monotonic() > end:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)

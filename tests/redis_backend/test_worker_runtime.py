"""The Redis path's C parts: uvloop for the worker's loop, hiredis for every client's replies.

The worker's one event loop reads, schedules and settles every API replica's entries, so its
CPU per request caps the scale-out's throughput (bench/README.md, "The Redis worker's CPU").
"""

from __future__ import annotations

import asyncio
import sys

import numpy as np
import pytest

from service.config import Settings
from service.queueing.redis_keys import make_client
from service.worker import event_loop_factory, redis_version_supported
from tests.redis_backend.helpers import (
    api_queue,
    assert_same,
    direct,
    make_item,
    running_worker,
    wait_for,
)


def test_worker_loop_is_uvloop_where_installed() -> None:
    factory = event_loop_factory()
    assert factory is not None, "uvloop (a dependency on Linux) is not importable"
    loop = factory()
    try:
        assert type(loop).__module__.startswith("uvloop")
        assert isinstance(loop, asyncio.AbstractEventLoop)
    finally:
        loop.close()


def test_worker_loop_falls_back_to_asyncio_without_uvloop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # makes `import uvloop` raise
    assert event_loop_factory() is None  # asyncio.Runner's default loop


async def test_redis_clients_parse_replies_with_hiredis() -> None:
    # No server needed: the parser is chosen when the connection object is made.
    client = make_client(Settings(redis_url="redis://127.0.0.1:1/0"))
    try:
        conn = client.connection_pool.make_connection()
        assert "Hiredis" in type(conn._parser).__name__, (
            "redis-py falls back to its Python parser: is hiredis (pyproject.toml) installed?"
        )
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("version", "ok"),
    [
        ("7.0.15", True),
        ("7.2.4", True),
        ("8.0.0", True),
        ("10.1", True),
        ("6.2.14", False),
        ("5.0.7", False),
        ("", False),
        ("unknown", False),
    ],
)
def test_redis_version_needed_by_the_worker(version: str, ok: bool) -> None:
    assert redis_version_supported(version) is ok


async def test_worker_says_when_redis_is_unreachable_from_the_start(
    make_settings, tiny_runners, caplog
) -> None:
    """Not only after losing a connection: a worker that never reached Redis says so too."""
    from tests.redis_support import free_port

    settings = make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    async with running_worker(settings, tiny_runners) as w:
        await wait_for(lambda: "unreachable" in caplog.text)
        assert not w.connected
    assert caplog.text.count("unreachable") == 1  # once per outage, not per retry


async def test_worker_is_ready_once_it_reaches_redis_not_after_its_first_blocked_read(
    make_settings, tiny_runners
) -> None:
    """/readyz (``connected``) used to wait for the first XREADGROUP to return, which with
    no work waits out the whole block time: 500 ms of every worker's start by default. The
    first read now returns at once. A block time far beyond the wait below tells them apart."""
    settings = make_settings(redis_block_ms=30_000)
    async with running_worker(settings, tiny_runners) as w:
        await wait_for(lambda: w.connected, timeout=10)
        async with api_queue(settings, tiny_runners) as q:
            # the next reads block as configured: work still wakes them
            runner = tiny_runners["pos-en"]
            item = make_item(runner, 7, np.random.default_rng(0))
            assert_same(await asyncio.wait_for(q.submit(item), 10), direct(runner, item))
            w.stop()  # the reader is blocked again; one more entry ends its read
            item = make_item(runner, 5, np.random.default_rng(1))
            assert_same(await asyncio.wait_for(q.submit(item), 10), direct(runner, item))

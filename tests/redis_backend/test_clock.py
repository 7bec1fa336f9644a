"""RedisClock: the offset of this process's monotonic clock to the Redis server's, from
TIME round trips (service/clock.py). Processes whose clocks are really off:
test_clock_skew.py."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from service.clock import CLOCK_WARN_S, RedisClock
from tests.faketime_support import release, require_libfaketime, stepping_env


def _at(unix: float) -> tuple[int, int]:
    """TIME's answer for ``unix``: (seconds, microseconds)."""
    return int(unix), round((unix - int(unix)) * 1e6)


def test_the_offset_is_the_round_trip_midpoint_of_the_tightest_recent_sample() -> None:
    clock = RedisClock("test")
    clock.record(10.0, _at(1000.5), 10.2)  # the server read 1000.5 within [10.0, 10.2]
    assert clock.offset == pytest.approx(1000.5 - 10.1)
    clock.record(20.0, _at(1010.45), 20.02)  # tighter: wins
    assert clock.offset == pytest.approx(1010.45 - 20.01)
    clock.record(30.0, _at(1020.45), 30.1)  # looser and consistent: does not
    assert clock.offset == pytest.approx(1010.45 - 20.01)


def test_a_step_of_the_servers_clock_replaces_the_older_samples_at_once() -> None:
    clock = RedisClock("test")
    clock.record(10.0, _at(1000.0), 10.002)
    clock.record(20.0, _at(1070.0), 20.2)  # 60 s later than the first sample allows
    assert clock.offset == pytest.approx(1070.0 - 20.1)


def test_a_host_clock_far_from_redis_is_logged_once_per_step(caplog) -> None:
    clock = RedisClock("worker w1")
    with caplog.at_level(logging.INFO, logger="service.clock"):
        for _ in range(3):
            sent = time.monotonic()
            clock.record(sent, _at(time.time() + 90), time.monotonic())
        assert clock.skew() == pytest.approx(90, abs=0.5)
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warned) == 1 and "90.0 s behind the Redis server's" in warned[0]
        assert warned[0].startswith("worker w1:")
        sent = time.monotonic()
        clock.record(sent, _at(time.time() + CLOCK_WARN_S / 10), time.monotonic())
    assert "within" in caplog.records[-1].getMessage()


async def test_sync_against_a_real_server_on_this_host(redis_url: str) -> None:
    """Redis runs on this host here: its clock is this host's wall clock."""
    client = aioredis.from_url(redis_url)
    try:
        clock = RedisClock("test")
        # A tuple, not `assert not clock.measured`: mypy would keep that narrowing across
        # the await below and take the asserts after it for unreachable.
        assert (clock.measured,) == (False,)
        await clock.sync(client)
    finally:
        await client.aclose()
    assert clock.measured
    assert abs(clock.skew()) < 0.5
    assert clock.now() == pytest.approx(time.time(), abs=0.5)


_DENIED_CHILD = """
import asyncio, sys, time
import redis.asyncio as aioredis
from service.clock import RedisClock

async def main():
    client = aioredis.from_url(sys.argv[1])
    clock = RedisClock("test")
    await clock.sync(client)  # TIME denied: this host's wall clock stands in
    await client.aclose()
    assert clock.denied
    base = time.time() - time.monotonic()
    open(sys.argv[2], "w").write("+3600\\n")  # NTP steps this host's clock an hour forward
    end = time.monotonic() + 10  # libfaketime reads the file within a second
    while time.time() - time.monotonic() - base < 3000 and time.monotonic() < end:
        await asyncio.sleep(0.1)  # (time.sleep: EINVAL under libfaketime)
    print(time.time() - time.monotonic() - base, time.time() - clock.now())

asyncio.run(main())
"""


@pytest.mark.skipif(
    bool(os.environ.get("NLPSERVE_REDIS_URL")),
    reason="adds an ACL user: needs a spawned Redis server",
)
def test_a_user_denied_time_follows_its_hosts_wall_clock_through_a_step(
    redis_url: str, tmp_path
) -> None:
    """Without ``+time`` (a rule from before it) the host's wall clock stands in, as it did
    in the releases before: read when used, not frozen at start. A frozen one kept a worker
    started before an NTP step an hour behind the others (its heartbeats an hour old: never
    counted alive; every deadline an hour away)."""
    lib = require_libfaketime()
    admin = redis.Redis.from_url(redis_url)
    user = f"no-time-{uuid.uuid4().hex[:8]}"
    admin.execute_command("ACL", "SETUSER", user, "on", ">pw", "~*", "&*", "+@all", "-time")
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    host_port = redis_url.split("//", 1)[1].split("@")[-1]
    url = f"redis://{user}:pw@{host_port}"
    env = {**os.environ, **stepping_env(offset, lib=lib)}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    proc = subprocess.Popen(
        [sys.executable, "-c", _DENIED_CHILD, url, str(offset)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        release(proc)
        admin.execute_command("ACL", "DELUSER", user)
        admin.close()
    assert proc.returncode == 0, err.decode()
    stepped, behind = (float(x) for x in out.split())
    assert stepped > 3000, "libfaketime did not step the child's clock"
    # the clock that stands in for Redis' went with the wall clock
    assert abs(behind) < 60, (out, err)

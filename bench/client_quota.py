"""Micro-benchmark of the per-client in-flight limit's admission and release
(service/api/client_quota.py): ``ClientQuota.hold`` of one item, entered and left, counted in
this process (``NLPSERVE_CLIENT_QUOTA_SCOPE=replica``) against counted across replicas in
Redis (``global``: a script to admit, one to release), on a private redis-server, alternated
round by round (medians; the first round warms up). Sequential holds give the latency a
request gains (two round trips); concurrent ones the event loop's CPU per request, where the
acquires and releases of one moment share a pipeline.

    python -m bench.client_quota --rounds 5

A benchmark, not a test: nothing is asserted. Needs ``redis-server`` on PATH.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from service.api.auth import ApiKeys
from service.api.client_quota import ClientQuota
from service.config import Settings
from service.metrics import Metrics
from service.queueing.redis_queue import RedisQueue
from tests.redis_support import RedisServer


async def measure(sequential: int, concurrent: int, tasks: int, rounds: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="nlpserve-quota-"))
    server = RedisServer(tmp / "redis")
    server.start()
    try:
        keys = tmp / "keys"
        keys.write_text("bench " + "k" * 32 + " max_in_flight=1000000\n")
        settings = Settings(queue="redis", redis_url=server.url, model_dir=tmp)
        metrics = Metrics()
        queue = RedisQueue(settings, {}, metrics)  # no model: only its client and clock
        await queue.start()
        quota = ClientQuota(None, ApiKeys(keys, metrics), metrics)
        shared = queue.shared_in_flight()

        async def holds(n: int) -> None:
            for _ in range(n):
                async with quota.hold("bench", 1, time.monotonic() + 30):
                    pass

        wall: dict[tuple[str, str], list[float]] = {}
        cpu: dict[str, list[float]] = {}
        for r in range(rounds + 1):
            for scope in ("replica", "global") if r % 2 else ("global", "replica"):
                quota.shared = shared if scope == "global" else None
                t = time.perf_counter()
                await holds(sequential)
                seq_us = (time.perf_counter() - t) / sequential * 1e6
                c, t = time.process_time(), time.perf_counter()
                await asyncio.gather(*(holds(concurrent // tasks) for _ in range(tasks)))
                conc_us = (time.perf_counter() - t) / concurrent * 1e6
                cpu_us = (time.process_time() - c) / concurrent * 1e6
                if r:
                    wall.setdefault((scope, "seq"), []).append(seq_us)
                    wall.setdefault((scope, "conc"), []).append(conc_us)
                    cpu.setdefault(scope, []).append(cpu_us)
        for scope in ("replica", "global"):
            print(
                f"{scope:8s} one at a time: {statistics.median(wall[scope, 'seq']):6.1f} µs "
                f"per request | {tasks} at once: {statistics.median(wall[scope, 'conc']):6.1f} "
                f"µs per request, process CPU {statistics.median(cpu[scope]):6.1f} µs"
            )
        await queue.close(0.1)
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequential", type=int, default=2000, help="holds one at a time")
    parser.add_argument("--concurrent", type=int, default=8000, help="holds in --tasks tasks")
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(measure(args.sequential, args.concurrent, args.tasks, args.rounds))


if __name__ == "__main__":
    main()

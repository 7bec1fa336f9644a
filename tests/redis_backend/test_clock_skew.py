"""Hosts whose clocks disagree, for real: an API replica and workers in child processes whose
wall clocks libfaketime puts tens of seconds off, against a spawned redis-server and over
HTTP (docs/scale-out.md, "Clocks").

The replica's clock runs 45 s ahead of Redis'; each worker's runs 90 s ahead of the
replica's, or 90 s behind it. A worker ahead used to drop every entry as expired (the
replica's deadlines read as 90 s past: 504 for every request) and, at its first heartbeat,
every other worker's (they read as 90 s old); a worker behind was never counted alive (its
heartbeats read as 90 s old: 503 ``no_workers``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from service.queueing.redis_keys import workers_key
from tests.faketime_support import require_libfaketime, skewed_env
from tests.redis_backend.processes import Cluster, metric

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("NLPSERVE_REDIS_URL")),
    reason="measures against its own Redis server's clock: needs a spawned one",
)

MODELS = ("pos-en", "polarity-en")
API_SKEW_S = 45.0
SKEW_S = 90.0  # between the replica and a worker: more than a heartbeat's 60 s of life


@pytest.fixture(scope="module")
def skewed(
    model_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Cluster, str]]:
    lib = require_libfaketime()
    tmp = tmp_path_factory.mktemp("skew")
    repo = tmp / "models"
    repo.mkdir()
    for m in MODELS:
        (repo / m).symlink_to(model_repo / m)
    c = Cluster(tmp, repo)
    # no live worker for a second: 503 at once, not a queued request's 504
    c.env["NLPSERVE_REDIS_NO_WORKER_FAIL_S"] = "1"
    try:
        c.start_api(**skewed_env(API_SKEW_S, lib=lib))
        c.wait_ready()
        yield c, lib
    finally:
        c.close()


def _workers_counted(url: str) -> int:
    r = httpx.get(f"{url}/readyz", timeout=5)
    return int(r.json().get("workers", 0)) if r.status_code == 200 else 0


@pytest.mark.parametrize(
    "worker_skew_s", [API_SKEW_S + SKEW_S, API_SKEW_S - SKEW_S], ids=["ahead", "behind"]
)
def test_a_worker_90_s_off_the_replica_is_counted_and_serves(
    skewed: tuple[Cluster, str], worker_skew_s: float
) -> None:
    cluster, lib = skewed
    # another worker's fresh heartbeat, on Redis' clock: no worker may take it for a dead one
    beats = workers_key(cluster.env["NLPSERVE_REDIS_PREFIX"])
    admin = redis.Redis.from_url(cluster.redis.url)
    secs, usecs = admin.time()
    admin.zadd(beats, {"bystander": secs + usecs / 1e6})
    proc, port = cluster.start_worker(**skewed_env(worker_skew_s, lib=lib))
    api = cluster.apis[0][1]
    try:
        cluster.wait_ready()
        # the replica counts the worker once a probe sees its first heartbeat
        end = time.monotonic() + 15
        while _workers_counted(api) < 2:
            assert time.monotonic() < end, (
                "the replica never counted the worker alive\n" + cluster.logs()
            )
            time.sleep(0.2)
        r = httpx.post(
            f"{api}/v1/polarity",
            json={"text": "a great film"},
            headers={"X-Deadline-Ms": "5000"},
            timeout=30,
        )
        assert r.status_code == 200, (r.text, cluster.logs())
        assert r.json()["label"] == "positive"
        assert metric(port, "nlpserve_worker_expired_total") == 0
        assert admin.zscore(beats, "bystander") is not None, "the worker dropped another's beat"
        # each process measured how far its wall clock is from Redis' (here: the true one)
        api_port = int(api.rpartition(":")[2])
        assert metric(api_port, "nlpserve_clock_offset_seconds") == pytest.approx(
            -API_SKEW_S, abs=5
        )
        assert metric(port, "nlpserve_clock_offset_seconds") == pytest.approx(-worker_skew_s, abs=5)
    finally:
        proc.stop()
        cluster.workers.remove((proc, port))
        admin.zrem(beats, "bystander")
        admin.close()
    assert "clock" in proc.log.read_text(), "the worker did not warn of its clock"

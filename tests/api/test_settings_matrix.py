"""The service under non-default settings answers what the default one answers.

One compact mixed workload (all four tasks, single and batch requests, short, long and
over-long inputs, QA contexts of several windows) is sent concurrently, twice, to a live
server under each configuration of ``INPROCESS`` and ``REDIS`` (a real redis-server and a
worker). Every answer must equal what the default configuration gives the same request in a
batch of one (fp32 everywhere: int8 answers move with their batch-mates, docs/service.md), no
request may get a 5xx, and the queue must be empty afterwards (nothing lost or left behind).
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from service.batching.buckets import bucket_edges
from service.config import Settings
from service.queueing.redis_keys import layout, make_client, model_streams
from tests.builders import FILLER, NEGATIVE, POS_LEXICON, POSITIVE
from tests.redis_support import redis_backend
from tests.service_support import (
    DETECT_MODEL,
    POLARITY_MODEL,
    POS_MODEL,
    QA_MODEL,
    LiveServer,
    live_server,
    make_settings,
    require_model,
    wait_for,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

# fp32 answers alone and in a padded batch agree to float rounding (tests/api/test_bucketing.py)
TOLERANCE = 1e-5

_QA_SHORT = "中国的首都是北京，它有三千多年的历史。"
_QA_LONG = "这是一段没有用的填充文字。" * 8 + _QA_SHORT + "还有更多的填充文字在这里。" * 6


def _words(vocab: list[str], n: int, start: int) -> list[str]:
    return [vocab[(start + 3 * i) % len(vocab)] for i in range(n)]


def _workload() -> list[tuple[str, dict[str, Any]]]:
    """(path, body) pairs; lengths spread over every bucket and past max_length (the tiny
    models: 32 tokens for polarity-en, 64 for the others)."""
    pol = POSITIVE + NEGATIVE + FILLER
    pos = [w for ws in POS_LEXICON.values() for w in ws]
    out: list[tuple[str, dict[str, Any]]] = []
    for n in (1, 3, 6, 11, 19, 30, 45):
        out.append(("/v1/polarity", {"text": " ".join(_words(pol, n, n))}))
        out.append(("/v1/detect", {"text": " ".join(_words(pol + pos, 2 * n, n))}))
        out.append(("/v1/pos", {"tokens": _words(pos, min(n, 60), n)}))
    out += [
        ("/v1/pos", {"text": "The dog sees a cat. It runs quickly!"}),
        ("/v1/polarity", {"inputs": [{"text": " ".join(_words(pol, k, k))} for k in (2, 9, 40)]}),
        ("/v1/detect", {"inputs": [{"text": " ".join(_words(pol, k, 1))} for k in (4, 70)]}),
        ("/v1/pos", {"inputs": [{"tokens": ["a", "dog"]}, {"text": " ".join(_words(pos, 25, 2))}]}),
        ("/v1/qa", {"question": "中国的首都是哪里？", "context": _QA_SHORT}),
        ("/v1/qa", {"question": "谁被称为诗仙？", "context": "李白是唐代著名诗人，被称为诗仙。"}),
        ("/v1/qa", {"question": "中国的首都是哪里？", "context": _QA_LONG}),
        (
            "/v1/qa",
            {
                "inputs": [
                    {"question": "首都在哪里？", "context": _QA_LONG},
                    {"question": "谁？", "context": "李白是诗人。"},
                ]
            },
        ),
        # the Open Inference Protocol (/v2) goes down /v1's pipeline
        (
            f"/v2/models/{POLARITY_MODEL}/infer",
            _v2({"text": [" ".join(_words(pol, 7, 1)), "dull"]}),
        ),
        (f"/v2/models/{QA_MODEL}/infer", _v2({"question": ["首都？"], "context": [_QA_LONG]})),
    ]
    return out


def _v2(tensors: dict[str, list[str]]) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": name, "shape": [len(data)], "datatype": "BYTES", "data": data}
            for name, data in tensors.items()
        ]
    }


WORKLOAD = _workload()
ALL_MODELS = (DETECT_MODEL, POLARITY_MODEL, POS_MODEL, QA_MODEL)
PATH_MODEL = {"/v1/qa": QA_MODEL, "/v1/detect": DETECT_MODEL, "/v1/pos": POS_MODEL}
PATH_MODEL["/v1/polarity"] = POLARITY_MODEL
PATH_MODEL |= {f"/v2/models/{m}/infer": m for m in ALL_MODELS}


def differs(got: Any, want: Any, where: str = "") -> str | None:
    """None when ``got`` matches ``want`` (floats within TOLERANCE), else what differs."""
    if isinstance(want, dict):
        if not isinstance(got, dict) or got.keys() != want.keys():
            return f"{where}: {got!r} != {want!r}"
        return next((d for k in want if (d := differs(got[k], want[k], f"{where}.{k}"))), None)
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return f"{where}: {got!r} != {want!r}"
        pairs = zip(got, want, strict=True)
        return next(
            (d for i, (g, w) in enumerate(pairs) if (d := differs(g, w, f"{where}[{i}]"))), None
        )
    if isinstance(want, float) and isinstance(got, int | float):
        return None if abs(got - want) <= TOLERANCE else f"{where}: {got} != {want}"
    return None if got == want else f"{where}: {got!r} != {want!r}"


def _settings(model_repo: Path, **overrides: Any) -> Settings:
    return make_settings(model_repo, variant="fp32", **overrides)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def expected(model_repo: Path) -> list[dict[str, Any]]:
    """The default configuration's answers, each request alone in batches of one."""
    for name in ALL_MODELS:
        require_model(model_repo, name)
    async with live_server(_settings(model_repo, max_batch_size=1)) as srv, srv.client() as c:
        answers = []
        for path, body in WORKLOAD:
            r = await c.post(path, json=body)
            assert r.status_code == 200, (path, r.text)
            answers.append(r.json())
    return answers


async def _check_workload(
    c: httpx.AsyncClient, expected: list[dict[str, Any]], loaded: set[str]
) -> None:
    """The workload twice, each time all at once: every answer as expected, none a 5xx."""
    for _ in range(2):
        responses = await asyncio.gather(*(c.post(path, json=body) for path, body in WORKLOAD))
        for (path, _body), r, want in zip(WORKLOAD, responses, expected, strict=True):
            if PATH_MODEL[path] not in loaded:
                assert r.status_code == 404, (path, r.text)
                continue
            assert r.status_code == 200, (path, r.text)
            assert (d := differs(r.json(), want, path)) is None, d


# Each a configuration a user may tune away from the defaults (tests/service_support.py's
# make_settings: CPU, 1 ORT thread per batch, 2 ms max wait, no padding floor, no grid).
INPROCESS: dict[str, dict[str, Any]] = {
    "no-fast-path": dict(fast_path=False),
    "one-thread": dict(inference_threads=1, intra_op_threads=0),
    "three-threads": dict(inference_threads=3),
    "no-prefetch": dict(prefetch_batches=0, inference_threads=1),
    "prefetch-3": dict(prefetch_batches=3),
    "wait-when-idle": dict(wait_when_idle=True, max_wait_ms=3),
    "no-wait": dict(max_wait_ms=0),
    "cpu-shape-grid": dict(shape_multiple=8, max_batch_size=6),
    "batch-of-one": dict(max_batch_size=1, shape_multiple=8),
    "budget-below-one-sequence": dict(max_batch_tokens=20),
    "floor-1": dict(min_padding_efficiency=1.0, max_batch_tokens=100_000),
    "default-floor": dict(min_padding_efficiency=None),
    "one-bucket-and-past-max": dict(
        buckets={POS_MODEL: [5], POLARITY_MODEL: [100, 200], DETECT_MODEL: [64], QA_MODEL: [1]}
    ),
    "no-graph-optimization": dict(graph_optimization="disable", inter_op_threads=2),
    "no-warmup": dict(warmup=False, min_padding_efficiency=None),
    "subset": dict(load_models=f"{POS_MODEL},{QA_MODEL}"),
}

REDIS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "read-one": dict(redis_read_count=1, worker_prefetch=1, max_batch_size=1),
    "fewest-connections": dict(redis_max_connections=3),
    "one-attempt-short-block": dict(redis_max_attempts=1, redis_block_ms=1),
    "short-claim-idle": dict(redis_claim_idle_ms=200, redis_max_attempts=1),
    "maxlen-is-depth": dict(redis_stream_maxlen=256, max_queue_depth=256),
    "no-prefetch-wait-when-idle": dict(
        prefetch_batches=0, inference_threads=1, wait_when_idle=True, max_wait_ms=1
    ),
    "grid-and-small-budget": dict(shape_multiple=8, max_batch_tokens=30, worker_prefetch=5),
}


@pytest.mark.parametrize("name", sorted(INPROCESS))
async def test_inprocess_settings_answer_as_the_defaults(model_repo, expected, name):
    settings = _settings(model_repo, **INPROCESS[name])
    async with live_server(settings) as srv, srv.client() as c:
        loaded = set(srv.state.tasks)
        await _check_workload(c, expected, loaded)
        q = srv.queue
        await wait_for(lambda: q.waiting == 0)
        assert all(q.depth(m) == 0 and q.in_flight(m) == 0 for m in loaded)


async def _streams_empty(settings: Settings, srv: LiveServer) -> bool:
    """Every work stream of the served models is empty: answered entries are deleted."""
    client = make_client(settings)
    try:
        for name, task in srv.state.tasks.items():
            edges = bucket_edges(task.manifest, settings)
            key = layout(task.manifest.version, edges)
            for stream in model_streams(settings.redis_prefix, name, key, len(edges)):
                if await client.xlen(stream):
                    return False
        return True
    finally:
        await client.aclose()


@pytest.mark.parametrize("name", sorted(REDIS))
async def test_redis_settings_answer_as_the_defaults(model_repo, expected, name):
    async with (
        redis_backend(_settings(model_repo, **REDIS[name])) as settings,
        live_server(settings) as srv,
        srv.client() as c,
    ):
        loaded = set(srv.state.tasks)
        await _check_workload(c, expected, loaded)
        # a worker deletes an entry right after publishing its reply
        for _ in range(500):
            if await _streams_empty(settings, srv):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("work entries left in the streams")


@pytest.mark.parametrize("queue", ["inprocess", "redis"])
async def test_a_client_deadline_shorter_than_the_max_wait_is_still_served(model_repo, queue):
    """NLPSERVE_WAIT_WHEN_IDLE holds a lone request for the max wait: a client's shorter
    X-Deadline-Ms (600 ms under a 3 s wait) got 504 without the request ever running. A
    sequence now waits at most half the time it had left when queued."""
    settings = _settings(model_repo, wait_when_idle=True, max_wait_ms=3000)
    async with contextlib.AsyncExitStack() as stack:
        if queue == "redis":
            settings = await stack.enter_async_context(redis_backend(settings))
        srv = await stack.enter_async_context(live_server(settings))
        c = await stack.enter_async_context(srv.client())
        # the worker's first batch may still be warming up: the long-deadline request first
        assert (await c.post("/v1/polarity", json={"text": "good"})).status_code == 200
        r = await c.post("/v1/polarity", json={"text": "good"}, headers={"X-Deadline-Ms": "600"})
        assert r.status_code == 200, r.text

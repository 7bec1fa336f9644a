"""Length-bucketed dynamic batching, observed through the in-process queue's batch log and
the metrics. Requests are held with ``queue.pause()`` until they are all queued, so which
batches form is deterministic (no timing assumptions)."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio

from service.repository import load_manifest
from tests.service_support import (
    DETECT_MODEL,
    QA_MODEL,
    live_server,
    make_settings,
    metric_value,
    read_metrics,
    require_model,
    wait_for,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def held(srv, c, requests: list[tuple[str, dict]], model: str, sequences: int):
    """Send ``requests`` while the queue is paused, release them together, return
    (responses, batch records that ran for them)."""
    q = srv.queue
    before = len(q.batch_log)
    q.pause()
    try:
        tasks = [asyncio.create_task(c.post(path, json=body)) for path, body in requests]
        await wait_for(lambda: q.depth(model) == sequences)
    finally:
        q.resume()
    responses = await asyncio.gather(*tasks)
    for r in responses:
        assert r.status_code == 200, r.text
    return responses, list(q.batch_log)[before:]


def words(n: int, word: str = "great") -> str:
    return " ".join([word] * n)


async def test_different_lengths_land_in_different_batches(inprocess_service):
    # pos-en buckets: [8, 16, 64]
    lengths = [3, 12, 40]
    async with inprocess_service.client() as c:
        reqs = [("/v1/pos", {"tokens": ["dog"] * n}) for n in lengths]
        _, batches = await held(inprocess_service, c, reqs, "pos-en", 3)
    assert sorted((b.bucket, b.size) for b in batches) == [(0, 1), (1, 1), (2, 1)]


async def test_concurrent_same_bucket_requests_share_one_batch(inprocess_service):
    async with inprocess_service.client() as c:
        before = await read_metrics(c)
        reqs = [("/v1/polarity", {"text": words(n)}) for n in (2, 3, 4, 5, 6, 7)]
        _, batches = await held(inprocess_service, c, reqs, "polarity-en", 6)
        after = await read_metrics(c)
    assert [(b.bucket, b.size) for b in batches] == [(0, 6)]
    assert batches[0].lengths == (2, 3, 4, 5, 6, 7)  # FIFO, padded only to 7
    labels = dict(model="polarity-en", bucket="0")
    count = "nlpserve_batch_size_count"
    assert metric_value(after, count, **labels) - metric_value(before, count, **labels) == 1
    total = "nlpserve_batch_size_sum"
    assert metric_value(after, total, **labels) - metric_value(before, total, **labels) == 6


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def padding_floor(model_repo):
    async with live_server(make_settings(model_repo, min_padding_efficiency=0.8)) as srv:
        yield srv


async def test_padding_floor_splits_unlike_lengths_of_one_bucket(padding_floor):
    """The CPU default: a sequence joins a batch only if the batch stays >= the floor's
    real/padded tokens. Oldest (6) + 7 = 0.93; + 3 would make 16/21 = 0.76 < 0.8, so 3 and 2
    make their own batch (5/6 = 0.83)."""
    async with padding_floor.client() as c:
        reqs = [("/v1/polarity", {"text": words(n)}) for n in (6, 7, 3, 2)]
        responses, batches = await held(padding_floor, c, reqs, "polarity-en", 4)
    assert sorted(b.lengths for b in batches) == [(3, 2), (6, 7)]
    assert {b.bucket for b in batches} == {0}
    # Same answers as one request at a time: splitting changes only the batches.
    async with padding_floor.client() as c:
        for (path, body), r in zip(reqs, responses, strict=True):
            alone = await c.post(path, json=body)
            assert alone.json() == r.json()


async def test_batch_request_items_share_a_batch(inprocess_service):
    q = inprocess_service.queue
    before = len(q.batch_log)
    async with inprocess_service.client() as c:
        body = {"inputs": [{"text": words(n, "bland")} for n in (4, 5, 6, 8)]}
        r = await c.post("/v1/polarity", json=body)
    assert r.status_code == 200
    assert [b.size for b in list(q.batch_log)[before:]] == [4]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def small_batches(model_repo):
    settings = make_settings(model_repo, max_batch_size=3, max_batch_tokens=40)
    async with live_server(settings) as srv:
        yield srv


async def test_max_batch_size_and_token_budget(small_batches):
    async with small_batches.client() as c:
        # 5 x 10 tokens: the size cap (3) binds before the budget (40 >= 3 x 10).
        reqs = [("/v1/polarity", {"text": words(10)})] * 5
        _, batches = await held(small_batches, c, reqs, "polarity-en", 5)
        # the log is in completion order, and two batches may run at once: compare as sets
        assert sorted((b.size for b in batches), reverse=True) == [3, 2]
        # 3 x 15 tokens: the budget binds (2 x 15 = 30 <= 40 < 45).
        reqs = [("/v1/polarity", {"text": words(15)})] * 3
        _, batches = await held(small_batches, c, reqs, "polarity-en", 3)
        assert sorted((b.size for b in batches), reverse=True) == [2, 1]
        assert all(b.size * max(b.lengths) <= 40 for b in batches)


# ------------------------------------------------------------------ padding never changes outputs
@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def fp32_service(model_repo):
    """fp32 everywhere: outputs must be identical alone and inside a padded batch (the int8
    variant's dynamic quantisation is batch-dependent; see test_runtime)."""
    # One bucket per model (its max length): the short and long inputs below must share a
    # batch whatever edges the tiny models' training data gave them.
    one_bucket = {
        name: [load_manifest(model_repo / name / "1").max_length]
        for name in ("pos-en", "polarity-en", DETECT_MODEL, QA_MODEL)
        if (model_repo / name / "1").is_dir()
    }
    settings = make_settings(model_repo, variant="fp32", buckets=one_bucket)
    async with live_server(settings) as srv:
        yield srv


CASES: dict[str, tuple[str, dict, dict]] = {
    "pos": (
        "pos-en",
        {"tokens": ["the", "dog"]},
        {"tokens": ["a", "big", "red", "cat", "."] + ["!"] * 2},
    ),
    "polarity": ("polarity-en", {"text": "superb"}, {"text": words(14, "dull")}),
    "detect": (DETECT_MODEL, {"text": "however"}, {"text": words(20, "lol")}),
    "qa": (
        QA_MODEL,
        {"question": "谁被称为诗仙？", "context": "李白是唐代著名诗人。"},
        {"question": "中国的首都是哪里？", "context": "中国的首都是北京，它有三千多年的历史。"},
    ),
}


@pytest.mark.parametrize("task", sorted(CASES))
async def test_outputs_identical_alone_and_in_a_padded_batch(fp32_service, model_repo, task):
    model, short, longer = CASES[task]
    require_model(model_repo, model)
    path = f"/v1/{task}"
    async with fp32_service.client() as c:
        alone = await c.post(path, json=short)
        assert alone.status_code == 200, alone.text
        reqs = [(path, short), (path, longer), (path, longer)]
        responses, batches = await held(fp32_service, c, reqs, model, 3)
    assert len(batches) == 1 and batches[0].size == 3, batches  # one padded batch
    assert len(set(batches[0].lengths)) > 1
    got, want = responses[0].json(), alone.json()
    assert got.keys() == want.keys()
    for k, v in want.items():
        if isinstance(v, float):
            assert got[k] == pytest.approx(v, abs=1e-6), k
        else:
            assert got[k] == v, k

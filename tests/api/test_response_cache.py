"""The response cache (``NLPSERVE_RESPONSE_CACHE_MB``, service/api/response_cache.py) over real
HTTP: off by default; a repeated item answered from the cache with the same body and no model
run; a batch of hits and misses in order; keys per model, input and protocol; LRU eviction;
another model version keys apart; errors and late answers not kept; a full hit is not refused
for a full queue; what a caller does to its results never reaches the cache; single-flight
(identical misses in flight run once; a failed or abandoned first run leaves its waiters to
run it themselves; a waiter's own deadline); in Redis mode a hit never reaches the stream (the
worker stopped)."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from service.api.response_cache import ResponseCache, Timing
from service.api.schemas import PolarityRequest, PolarityResponse, PosResponse
from service.config import Settings
from service.metrics import Metrics
from service.repository import ModelEntry, discover_models
from service.repository.manifest import MANIFEST_FILE, load_manifest
from service.tasks import build_tasks
from service.tasks.base import Task
from tests.redis_support import RedisServer, unique_prefix
from tests.service_support import (
    DETECT_MODEL,
    POLARITY_MODEL,
    POS_MODEL,
    QA_MODEL,
    LiveServer,
    live_server,
    make_settings,
    metric_value,
    read_metrics,
    require_model,
    rounded,
    wait_for,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

LOADED = f"{POLARITY_MODEL},{POS_MODEL}"  # the LSTMs: a server starts in a second


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def cached(model_repo: Path) -> AsyncIterator[LiveServer]:
    settings = make_settings(model_repo, load_models=LOADED, response_cache_mb=1, max_queue_depth=4)
    async with live_server(settings) as srv:
        yield srv


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def plain(model_repo: Path) -> AsyncIterator[LiveServer]:
    """The same server with the cache off (the default): what every answer must equal."""
    async with live_server(make_settings(model_repo, load_models=LOADED)) as srv:
        yield srv


@pytest_asyncio.fixture(loop_scope="session")
async def srv(cached: LiveServer) -> AsyncIterator[LiveServer]:
    cached.queue.resume()
    yield cached
    cached.queue.resume()


def cache_timing(r: httpx.Response) -> str | None:
    """The ``desc`` of the Server-Timing ``cache`` entry (None: there is none)."""
    for part in r.headers["server-timing"].split(", "):
        name, *params = part.split(";")
        if name == "cache":
            return dict(p.split("=") for p in params)["desc"]
    return None


def stages(r: httpx.Response) -> list[str]:
    return [part.split(";")[0] for part in r.headers["server-timing"].split(", ")]


def ran(metrics: str, model: str) -> float:
    """Sequences the model has run (the batch-size histogram's sum)."""
    return metric_value(metrics, "nlpserve_batch_size_sum", model=model)


def counted(srv: LiveServer, name: str) -> float:
    """The polarity model's ``nlpserve_response_cache_<name>_total`` now, read in-process (a
    state to wait on while requests are held in the paused queue)."""
    value = srv.state.metrics.registry.get_sample_value(
        f"nlpserve_response_cache_{name}_total", {"model": POLARITY_MODEL}
    )
    return value or 0.0


# --------------------------------------------------------------------------- off
async def test_off_by_default_no_cache_and_no_series(plain):
    assert plain.settings.response_cache_mb == 0 and plain.state.response_cache is None
    async with plain.client() as c:
        for _ in range(2):
            r = await c.post("/v1/polarity", json={"text": "off by default, twice"})
            assert r.status_code == 200, r.text
            assert stages(r) == ["tokenize", "queue", "inference"]
        assert "nlpserve_response_cache" not in await read_metrics(c)


# --------------------------------------------------------------------------- hits
async def test_a_repeated_item_is_answered_from_the_cache_without_the_model(srv, plain):
    body = {"text": "A repeated headline, classified by many services."}
    async with srv.client() as c, plain.client() as p:
        first = await c.post("/v1/polarity", json=body)
        assert first.status_code == 200, first.text
        assert cache_timing(first) == "miss"
        assert stages(first) == ["cache", "tokenize", "queue", "inference"]
        before = await read_metrics(c)

        again = await c.post("/v1/polarity", json=body)
        assert again.status_code == 200, again.text
        assert again.content == first.content  # byte for byte
        assert cache_timing(again) == "hit" and stages(again) == ["cache"]
        after = await read_metrics(c)
        expected = await p.post("/v1/polarity", json=body)
    assert again.json() == expected.json()  # what the server without a cache answers
    assert ran(after, POLARITY_MODEL) == ran(before, POLARITY_MODEL)  # the model did not run
    hits = "nlpserve_response_cache_hits_total"
    assert metric_value(after, hits, model=POLARITY_MODEL) == (
        metric_value(before, hits, model=POLARITY_MODEL) + 1
    )
    counted = {"model": POLARITY_MODEL, "endpoint": "predict", "status": "200"}
    assert metric_value(after, "nlpserve_requests_total", **counted) == (
        metric_value(before, "nlpserve_requests_total", **counted) + 1
    )
    assert metric_value(after, "nlpserve_response_cache_bytes") > 0


async def test_a_batch_runs_only_its_misses_and_answers_in_order(srv, plain):
    texts = [f"batch item {i}: a {w} film" for i, w in enumerate(("fine", "dull", "great", "bad"))]
    batch = {"inputs": [{"text": t} for t in texts]}
    async with srv.client() as c, plain.client() as p:
        for t in texts[::2]:  # items 0 and 2 cached alone
            assert (await c.post("/v1/polarity", json={"text": t})).status_code == 200
        before = await read_metrics(c)
        r = await c.post("/v1/polarity", json=batch)
        assert r.status_code == 200, r.text
        after = await read_metrics(c)
        expected = await p.post("/v1/polarity", json=batch)
        again = await c.post("/v1/polarity", json=batch)
    assert cache_timing(r) == "partial"
    assert rounded(r.json()) == rounded(expected.json())  # the right answers, in order
    assert ran(after, POLARITY_MODEL) - ran(before, POLARITY_MODEL) == 2  # items 1 and 3
    for name, moved in (("hits", 2), ("misses", 2)):
        series = f"nlpserve_response_cache_{name}_total"
        assert metric_value(after, series, model=POLARITY_MODEL) == (
            metric_value(before, series, model=POLARITY_MODEL) + moved
        )
    assert cache_timing(again) == "hit" and again.content == r.content


async def test_hits_count_as_predictions_not_as_inputs(srv):
    """An item answered from the cache (or from an identical item's run in flight) is an
    answer the client got: in the prediction series (label and confidence) as if the model
    ran, /v1 and /v2 alike; it was never tokenized, so the input series leave it out
    (docs/service.md, "Predictions and inputs")."""
    text = "A film counted once per answer, read once by the model."
    v2_body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}
    async with srv.client() as c:
        before = await read_metrics(c)
        answers = [await c.post("/v1/polarity", json={"inputs": [{"text": text}] * 2})]
        answers.append(await c.post("/v1/polarity", json={"text": text}))
        v2 = [await c.post(f"/v2/models/{POLARITY_MODEL}/infer", json=v2_body) for _ in range(2)]
        after = await read_metrics(c)
    assert all(r.status_code == 200 for r in answers + v2), [r.text for r in answers + v2]
    assert cache_timing(answers[1]) == cache_timing(v2[1]) == "hit"
    label = answers[1].json()["label"]

    def moved(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    # 5 items answered: 2 + 1 on /v1, 2 on /v2 (each protocol's results are cached apart)
    assert moved("nlpserve_predictions_total", model=POLARITY_MODEL) == 5
    assert moved("nlpserve_predictions_total", model=POLARITY_MODEL, label=label) == 5
    assert moved("nlpserve_prediction_confidence_count", model=POLARITY_MODEL) == 5
    p = answers[1].json()["positive_probability"]
    confidence = moved("nlpserve_prediction_confidence_sum", model=POLARITY_MODEL)
    assert confidence == pytest.approx(5 * max(p, 1 - p), abs=1e-5)
    # read by the model: the batch's first item (its twin waited for that run: single-flight)
    # and the first /v2 one
    assert moved("nlpserve_input_tokens_count", model=POLARITY_MODEL) == 2
    assert ran(after, POLARITY_MODEL) - ran(before, POLARITY_MODEL) == 2


async def test_keys_differ_by_model_input_and_protocol(srv):
    text = "The cats sat on the mat ."
    async with srv.client() as c:
        assert cache_timing(await c.post("/v1/polarity", json={"text": text})) == "miss"
        # the same text to another model, and the same words as `tokens`: other answers
        assert cache_timing(await c.post("/v1/pos", json={"text": text})) == "miss"
        as_tokens = {"tokens": text.split()}
        assert cache_timing(await c.post("/v1/pos", json=as_tokens)) == "miss"
        assert cache_timing(await c.post("/v1/pos", json=as_tokens)) == "hit"
        # the V2 protocol decodes more (every class's probability): its own entries
        v2 = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}
        first = await c.post(f"/v2/models/{POLARITY_MODEL}/infer", json=v2)
        assert first.status_code == 200, first.text
        assert cache_timing(first) == "miss"
        again = await c.post(f"/v2/models/{POLARITY_MODEL}/infer", json=v2)
        assert cache_timing(again) == "hit" and again.content == first.content
        assert "probabilities" in again.text


async def test_request_options_key_apart(model_repo: Path):
    """An option that changes the answer (detect's windows, qa's top_k and
    max_answer_length, pos's scores) makes another entry: never the same text's answer
    without it."""
    require_model(model_repo, QA_MODEL)
    models = f"{DETECT_MODEL},{QA_MODEL},{POS_MODEL}"
    settings = make_settings(model_repo, load_models=models, response_cache_mb=1)
    text = " ".join(["the committee met on a quiet tuesday morning"] * 40)
    qa = {"question": "长城有多长？", "context": "长城总长度超过两万千米。"}
    asked = [
        ("/v1/detect", {"text": text}, {"text": text, "windows": True}, "windows"),
        ("/v1/qa", qa, {**qa, "top_k": 3}, "answers"),
        ("/v1/pos", {"text": "The dog barks ."}, {"text": "The dog barks .", "scores": True},
         "scores"),
    ]  # fmt: skip
    async with live_server(settings) as srv, srv.client() as c:
        for path, bare, with_option, field in asked:
            first = await c.post(path, json=bare)
            assert cache_timing(first) == "miss" and field not in first.json(), first.text
            other = await c.post(path, json=with_option)
            assert cache_timing(other) == "miss" and field in other.json(), other.text
            again = await c.post(path, json=with_option)
            assert cache_timing(again) == "hit" and again.content == other.content
            assert (await c.post(path, json=bare)).content == first.content
        short = await c.post("/v1/qa", json={**qa, "max_answer_length": 1})
        assert cache_timing(short) == "miss" and len(short.json()["answer"]) <= 1, short.text


# --------------------------------------------------------------------------- not kept
async def test_errors_are_not_cached_and_name_the_request_item(srv, plain):
    limit = srv.state.tasks[POS_MODEL].max_length
    good = {"tokens": ["errors", "are", "not", "kept"]}
    bad = {"tokens": ["word"] * (limit + 1)}  # over the model's length: 422 from its encoder
    cached_item = {"tokens": ["a", "cached", "item"]}
    batch = {"inputs": [cached_item, good, bad]}
    async with srv.client() as c, plain.client() as p:
        assert (await c.post("/v1/pos", json=cached_item)).status_code == 200
        r = await c.post("/v1/pos", json=batch)
        expected = await p.post("/v1/pos", json=batch)
        assert r.status_code == 422, r.text
        # the items run were 2 of 3: the error still names the request's inputs[2]
        assert r.json() == expected.json() and "inputs[2]: " in r.text
        assert cache_timing(await c.post("/v1/pos", json=good)) == "miss"  # not kept either
        single = await c.post("/v1/pos", json={"inputs": [cached_item, bad]})
        alone = await p.post("/v1/pos", json={"inputs": [cached_item, bad]})
        assert single.json() == alone.json() and "inputs[1]: " in single.text


async def test_a_late_answer_is_not_kept(srv):
    body = {"text": "a text that waits past its deadline"}
    srv.queue.pause()
    async with srv.client() as c:
        r = await c.post("/v1/polarity", json=body, headers={"X-Deadline-Ms": "300"})
        assert r.status_code == 504, r.text
        srv.queue.resume()
        assert cache_timing(await c.post("/v1/polarity", json=body)) == "miss"


async def test_a_full_hit_is_answered_while_the_queue_is_full(srv):
    body = {"text": "answered while the queue is full"}
    q = srv.queue
    async with srv.client() as c:
        assert (await c.post("/v1/polarity", json=body)).status_code == 200
        q.pause()
        held = [
            asyncio.create_task(c.post("/v1/polarity", json={"text": f"held text {i}"}))
            for i in range(4)  # the fixture's NLPSERVE_MAX_QUEUE_DEPTH
        ]
        await wait_for(lambda: q.depth(POLARITY_MODEL) == 4)
        refused = await c.post("/v1/polarity", json={"text": "not cached, queue full"})
        assert refused.status_code == 429, refused.text
        hit = await c.post("/v1/polarity", json=body)
        assert hit.status_code == 200 and cache_timing(hit) == "hit"
        # a batch with a miss still goes through admission: refused whole
        mixed = {"inputs": [body, {"text": "another text, not cached"}]}
        assert (await c.post("/v1/polarity", json=mixed)).status_code == 429
        q.resume()
        assert all(r.status_code == 200 for r in await asyncio.gather(*held))


# --------------------------------------------------------------------------- isolation
async def test_what_a_caller_does_to_its_results_never_reaches_the_cache(srv):
    """Kept as bytes, thawed anew for each answer: neither the result a miss returned nor
    one a hit returned is the cache's own (a cache that kept or returned the object itself
    would answer the mutation next)."""
    cache = ResponseCache(10_000, Metrics())
    tagged = PosResponse(tokens=["a", "cat"], tags=["DT", "NN"])
    row = {"label": "positive", "probability": 0.75, "probabilities": [0.25, 0.75]}
    cache.put(b"pos", tagged)
    cache.put(b"row", row)
    tagged.tokens.append("mutated")
    row["probabilities"].append(1.0)  # type: ignore[attr-defined]
    for _ in range(2):
        found, got = cache.get(b"pos")
        assert found and got == PosResponse(tokens=["a", "cat"], tags=["DT", "NN"])
        got.tags.clear()
        found, got_row = cache.get(b"row")
        assert found and got_row["probabilities"] == [0.25, 0.75]
        got_row["probabilities"].clear()

    # through serve(), the one path of every protocol: a miss's own result, then a hit's
    task = srv.state.tasks[POLARITY_MODEL]
    item = PolarityRequest(text="a result the caller scribbles on")
    original = PolarityResponse(label="positive", positive_probability=0.9, truncated=False)
    deadline = asyncio.get_running_loop().time() + 60

    async def run(todo: list[Any]) -> list[Any]:
        return [original.model_copy() for _ in todo]

    (first,) = await cache.serve(task, None, [item], task.decode, deadline, Timing(), run)
    first.label = "negative"
    (hit,) = await cache.serve(task, None, [item], task.decode, deadline, Timing(), run)
    assert hit == original and hit is not first
    hit.positive_probability = 0.0
    (again,) = await cache.serve(task, None, [item], task.decode, deadline, Timing(), run)
    assert again == original


async def test_a_result_its_json_cannot_carry_is_answered_but_not_kept():
    """JSON writes NaN as null, which the float field would not read back: not kept, rather
    than a hit that fails (or answers otherwise than the miss did)."""
    cache = ResponseCache(10_000, Metrics())
    cache.put(
        b"nan", PolarityResponse(label="x", positive_probability=float("nan"), truncated=False)
    )
    assert len(cache) == 0 and cache.bytes == 0
    cache.put(b"row", {"probability": float("nan")})  # pickled rows carry NaN as it is
    found, row = cache.get(b"row")
    assert found and row["probability"] != row["probability"]
    cache.put(b"fn", {"how": lambda: 0})  # no pickle of it: answered, never kept
    assert not cache.get(b"fn")[0]


# --------------------------------------------------------------------------- single-flight
async def test_waiters_on_a_run_whose_result_cannot_be_kept_run_it_at_once(srv):
    """A result with no kept form (a NaN probability) cannot be shared: the requests that
    waited on its run each run the item, together, not one after another (a hot item's
    waiters would queue behind each other's model runs, one round trip each)."""
    cache = ResponseCache(10_000, Metrics())
    task = srv.state.tasks[POLARITY_MODEL]
    item = PolarityRequest(text="an item whose probability comes back NaN")
    nan = PolarityResponse(label="positive", positive_probability=float("nan"), truncated=False)
    deadline = asyncio.get_running_loop().time() + 60
    started: list[int] = []
    gates = [asyncio.Event() for _ in range(4)]

    async def run(todo: list[Any]) -> list[Any]:
        k = len(started)
        started.append(k)
        await gates[k].wait()  # the test says when each run answers
        return [nan.model_copy() for _ in todo]

    async def settle() -> None:  # no I/O here: a few loop turns let every waiter move
        for _ in range(50):
            await asyncio.sleep(0)

    calls = [
        asyncio.create_task(cache.serve(task, None, [item], task.decode, deadline, Timing(), run))
        for _ in range(3)
    ]
    try:
        await settle()
        assert started == [0]  # the first runs it, the others wait on that run
        gates[0].set()
        await settle()
        assert started == [0, 1, 2]  # both waiters running at once, neither behind the other
    finally:
        for gate in gates:
            gate.set()
        answers = await asyncio.gather(*calls)
    assert all(
        a.label == "positive" and a.positive_probability != a.positive_probability
        for (a,) in answers
    )
    assert len(cache) == 0


async def test_identical_concurrent_misses_run_once(srv, plain):
    """Requests for one item while its first request is still running (held in the paused
    queue) wait for that run: one sequence run, every answer the same as without a cache."""
    body = {"text": "one headline, asked by many clients at once"}
    n = 4
    q = srv.queue
    async with srv.client() as c, plain.client() as p:
        before = await read_metrics(c)
        misses, coalesced = counted(srv, "misses"), counted(srv, "coalesced")
        q.pause()
        calls = [asyncio.create_task(c.post("/v1/polarity", json=body)) for _ in range(n)]
        # every request looked its item up, and one sequence is queued: the others wait
        await wait_for(lambda: counted(srv, "misses") == misses + n)
        await wait_for(lambda: q.depth(POLARITY_MODEL) == 1)
        q.resume()
        answers = await asyncio.gather(*calls)
        after = await read_metrics(c)
        expected = await p.post("/v1/polarity", json=body)
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    assert {r.content for r in answers} == {expected.content}
    assert ran(after, POLARITY_MODEL) - ran(before, POLARITY_MODEL) == 1
    assert counted(srv, "coalesced") == coalesced + n - 1
    series = "nlpserve_response_cache_coalesced_total"
    assert metric_value(after, series, model=POLARITY_MODEL) == coalesced + n - 1
    assert [cache_timing(r) for r in answers] == ["miss"] * n  # none was held


async def test_a_batch_repeating_an_item_runs_it_once(srv, plain):
    batch = {"inputs": [{"text": "said twice in one batch"}, {"text": "once"}] * 2}
    async with srv.client() as c, plain.client() as p:
        before = await read_metrics(c)
        r = await c.post("/v1/polarity", json=batch)
        after = await read_metrics(c)
        expected = await p.post("/v1/polarity", json=batch)
    assert r.status_code == 200 and r.content == expected.content
    assert ran(after, POLARITY_MODEL) - ran(before, POLARITY_MODEL) == 2


async def test_when_the_first_run_fails_its_waiters_run_the_item_themselves(srv, plain):
    """The first request's deadline passes in the paused queue (504): the ones waiting on its
    run neither hang nor share its error; one of them runs the item, the others wait on that."""
    body = {"text": "its first request gives up before the model runs"}
    q = srv.queue
    async with srv.client() as c, plain.client() as p:
        misses, coalesced = counted(srv, "misses"), counted(srv, "coalesced")
        q.pause()
        first = asyncio.create_task(
            c.post("/v1/polarity", json=body, headers={"X-Deadline-Ms": "400"})
        )
        await wait_for(lambda: q.depth(POLARITY_MODEL) == 1)
        waiters = [asyncio.create_task(c.post("/v1/polarity", json=body)) for _ in range(3)]
        await wait_for(lambda: counted(srv, "misses") == misses + 4)
        failed = await first
        assert failed.status_code == 504, failed.text
        assert not any(w.done() for w in waiters)
        before = await read_metrics(c)
        # one waiter's run queued; the abandoned item is still counted until the paused
        # loop purges it (it never runs)
        await wait_for(lambda: q.depth(POLARITY_MODEL) == 2)
        q.resume()
        answers = await asyncio.gather(*waiters)
        after = await read_metrics(c)
        expected = await p.post("/v1/polarity", json=body)
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    assert {r.content for r in answers} == {expected.content}
    assert ran(after, POLARITY_MODEL) - ran(before, POLARITY_MODEL) == 1
    assert counted(srv, "coalesced") == coalesced + 2


async def test_when_the_first_client_leaves_its_waiters_still_get_answers(srv, plain):
    """The first client hangs up while its item is queued: its run is withdrawn (499), and a
    waiter runs the item instead; the model runs it once."""
    body = {"text": "its first client hangs up"}
    q = srv.queue
    registry = srv.state.metrics.registry
    closed = {
        "model": POLARITY_MODEL,
        "endpoint": "predict",
        "status": "499",
        "priority": "interactive",
    }

    def gone() -> float:
        return registry.get_sample_value("nlpserve_requests_total", closed) or 0.0

    async with srv.client() as c, srv.client() as leaving, plain.client() as p:
        misses, left = counted(srv, "misses"), gone()
        before = await read_metrics(c)
        q.pause()
        first = asyncio.create_task(leaving.post("/v1/polarity", json=body))
        await wait_for(lambda: q.depth(POLARITY_MODEL) == 1)
        waiters = [asyncio.create_task(c.post("/v1/polarity", json=body)) for _ in range(2)]
        await wait_for(lambda: counted(srv, "misses") == misses + 3)
        first.cancel()
        await leaving.aclose()  # the connection closed: the server withdraws its work
        await wait_for(lambda: gone() == left + 1)
        # one waiter's run queued; the abandoned item is still counted until the paused
        # loop purges it (it never runs)
        await wait_for(lambda: q.depth(POLARITY_MODEL) == 2)
        q.resume()
        answers = await asyncio.gather(*waiters)
        after = await read_metrics(c)
        expected = await p.post("/v1/polarity", json=body)
    assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
    assert {r.content for r in answers} == {expected.content}
    assert ran(after, POLARITY_MODEL) - ran(before, POLARITY_MODEL) == 1


async def test_a_waiter_keeps_its_own_deadline_and_leaves_the_run_alone(srv):
    """A waiter whose deadline passes first answers 504 itself; the run it waited on goes on
    and answers its own request (and is kept)."""
    body = {"text": "a patient first request, an impatient second"}
    q = srv.queue
    async with srv.client() as c:
        misses = counted(srv, "misses")
        q.pause()
        first = asyncio.create_task(c.post("/v1/polarity", json=body))
        await wait_for(lambda: q.depth(POLARITY_MODEL) == 1)
        second = await c.post("/v1/polarity", json=body, headers={"X-Deadline-Ms": "300"})
        assert counted(srv, "misses") == misses + 2
        assert second.status_code == 504, second.text
        assert second.json()["error"]["code"] == "deadline_exceeded"
        assert not first.done() and q.depth(POLARITY_MODEL) == 1
        q.resume()
        answer = await first
        assert answer.status_code == 200, answer.text
        assert cache_timing(await c.post("/v1/polarity", json=body)) == "hit"


# --------------------------------------------------------------------------- bounds
async def test_least_recently_used_results_are_evicted_within_the_budget(model_repo):
    budget_mb = 0.0004  # 400 bytes: a few polarity results
    settings = make_settings(model_repo, load_models=POLARITY_MODEL, response_cache_mb=budget_mb)
    async with live_server(settings) as s, s.client() as c:
        cache = s.state.response_cache
        assert cache is not None and cache.max_bytes == 400
        texts = [f"eviction text number {i}" for i in range(12)]
        for t in texts:
            assert (await c.post("/v1/polarity", json={"text": t})).status_code == 200
            assert cache.bytes <= 400
        kept = len(cache)
        assert 1 < kept < len(texts)
        metrics = await read_metrics(c)
        assert metric_value(metrics, "nlpserve_response_cache_evictions_total") == (
            len(texts) - kept
        )
        assert metric_value(metrics, "nlpserve_response_cache_bytes") == cache.bytes
        # the newest are held, the oldest gone; a hit makes an entry the newest
        assert cache_timing(await c.post("/v1/polarity", json={"text": texts[-kept]})) == "hit"
        assert cache_timing(await c.post("/v1/polarity", json={"text": texts[0]})) == "miss"
        # texts[-kept] was used just now: texts[-kept + 1], the oldest, made room for texts[0]
        assert cache_timing(await c.post("/v1/polarity", json={"text": texts[-kept]})) == "hit"
        assert cache_timing(await c.post("/v1/polarity", json={"text": texts[-kept + 1]})) == "miss"


async def test_another_model_version_or_file_keys_apart(model_repo: Path, tmp_path: Path):
    """A model loaded anew (a Task object of another version, or whose file changed) never
    finds the results of the one before: its fingerprint is in every key."""
    repo = tmp_path / "repo"
    shutil.copytree(model_repo / POLARITY_MODEL / "1", repo / POLARITY_MODEL / "1")
    shutil.copytree(model_repo / POLARITY_MODEL / "1", repo / POLARITY_MODEL / "2")
    manifest_2 = repo / POLARITY_MODEL / "2" / MANIFEST_FILE
    manifest: dict[str, Any] = json.loads(manifest_2.read_text())
    manifest["version"] = "2"
    manifest_2.write_text(json.dumps(manifest))
    settings = make_settings(repo)

    def task_at(version: str) -> Task:
        (entry,) = discover_models(repo, select={POLARITY_MODEL: version})
        return build_tasks([entry], settings)[POLARITY_MODEL]

    cache = ResponseCache(10_000, Metrics())
    v1, v1_again, v2 = task_at("1"), task_at("1"), task_at("2")
    item = PolarityRequest(text="the same text")

    def key(task: Task) -> bytes:
        return cache.keys(task, None, task.decode, [item])[0]

    assert key(v1) == key(v1_again)  # the same model loaded twice: its results still hold
    assert key(v2) != key(v1)  # another version
    cache.put(key(v1), {"label": "positive"})
    assert cache.get(key(v1))[0] and not cache.get(key(v2))[0]
    # the same version with another file (a rebuilt variant: another sha256)
    manifest["version"] = "1"
    manifest["variants"]["fp32"]["sha256"] = "0" * 64
    (repo / POLARITY_MODEL / "1" / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert key(_unchecked_task(repo, settings)) != key(v1)


def _unchecked_task(repo: Path, settings: Settings) -> Task:
    """The polarity task at version 1 as its (rewritten) manifest says, files unchecked."""
    folder = repo / POLARITY_MODEL / "1"
    entry = ModelEntry(folder, load_manifest(folder, check_files=False))
    return build_tasks([entry], settings)[POLARITY_MODEL]


# --------------------------------------------------------------------------- Redis
async def test_redis_mode_a_hit_never_reaches_the_stream(model_repo: Path, tmp_path: Path):
    """The worker stopped, a cached item is still answered; another waits for none."""
    from service.runtime.runner import load_runners
    from service.worker import Worker

    redis = RedisServer(tmp_path / "redis")
    redis.start()
    try:
        settings = make_settings(
            model_repo,
            load_models=POLARITY_MODEL,
            response_cache_mb=1,
            queue="redis",
            redis_url=redis.url,
            redis_prefix=unique_prefix(),
            redis_block_ms=100,
            metrics_port=0,
            metrics_host="127.0.0.1",
        )
        worker = Worker(settings, await asyncio.to_thread(load_runners, settings))
        running = asyncio.create_task(worker.run())
        body = {"text": "a cached item in Redis mode"}
        try:
            async with live_server(settings) as s, s.client() as c:
                first = await c.post("/v1/polarity", json=body)
                assert first.status_code == 200 and cache_timing(first) == "miss"
                worker.stop()
                await asyncio.wait_for(running, timeout=15)
                again = await c.post("/v1/polarity", json=body)
                assert again.status_code == 200 and again.content == first.content
                assert cache_timing(again) == "hit"
                other = await c.post(
                    "/v1/polarity", json={"text": "not cached"}, headers={"X-Deadline-Ms": "500"}
                )
                assert other.status_code in (503, 504), other.text  # no worker: proof
        finally:
            worker.stop()
            await asyncio.wait_for(running, timeout=15)
    finally:
        redis.stop()

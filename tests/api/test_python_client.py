"""The Python client (service/client/) against a real server over real HTTP: every method
answers what a raw HTTP call does, sync and async; errors map to their exception with the
API's code and message; the API key goes as X-API-Key; retries: a real 429 (the client's
in-flight limit, NLPSERVE_CLIENT_MAX_IN_FLIGHT) waits out its Retry-After, a real refused
connection (a server still starting) is retried, a 4xx never is. The cases no live server
produces on demand (502, a Retry-After of another length, a gateway's HTML error, an answer
that never comes) are a small raw HTTP server's, as the load generator's tests do."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import io
import json
import re
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from service.api.app import create_app
from service.client import (
    AsyncClient,
    AuthenticationError,
    BatchLimits,
    Client,
    ClientError,
    DeadlineExceeded,
    DetectWindow,
    ErrorLimit,
    IncompleteBatch,
    NlpserveError,
    QASpan,
    RetriesExhausted,
    RetryPolicy,
    ServerError,
    TransportError,
)
from service.client import _calls as calls
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

ROOT = Path(__file__).resolve().parents[2]
KEY = "client-test-key-0123456789"
LIMIT = 2  # alice's in-flight limit: LIMIT held requests make the next one a 429
FREE_KEY = "client-test-free-0123456789"  # erin: no limit of her own
IN_FLIGHT_KEY = "client-test-in-flight-0123456789"  # carol: max_in_flight=3
BURST_KEY = "client-test-burst-0123456789"  # dave: bursts of 2 (rate=1000 burst=2)
RATE_KEY = "client-test-rate-0123456789"  # frank: one item a second (rate=1 burst=1)
HEADERS = {"X-API-Key": KEY}
# Fast retries for the tests that need some (the delay is honoured, not measured, there).
QUICK = RetryPolicy(retries=3, backoff_s=0.01, max_backoff_s=0.05)


# --------------------------------------------------------------------------- live server
@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("client") / "api-keys"
    path.write_text(
        f"alice {KEY} max_in_flight={LIMIT}\nerin {FREE_KEY}\n"
        f"carol {IN_FLIGHT_KEY} max_in_flight=3\ndave {BURST_KEY} rate=1000 burst=2\n"
        f"frank {RATE_KEY} rate=1 burst=1\n"
    )
    return path


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def client_service(model_repo: Path, keys_file: Path) -> AsyncIterator[LiveServer]:
    async with live_server(make_settings(model_repo, api_keys_file=keys_file)) as srv:
        yield srv


@pytest_asyncio.fixture(loop_scope="session")
async def srv(client_service: LiveServer) -> AsyncIterator[LiveServer]:
    client_service.queue.resume()
    yield client_service
    client_service.queue.resume()


@pytest_asyncio.fixture(loop_scope="session")
async def raw(srv: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    async with srv.client(headers=HEADERS) as c:
        yield c


QUESTION, CONTEXT = "长城有多长？", "长城是中国古代的军事防御工程，总长度超过两万千米。"
REVIEW = "A charming, funny and moving film."
ESSAY = "There are several reasons why the sky appears blue. Sunlight is made up of colors."

# (method, args, kwargs, needed model, HTTP method, path, body): the same request both ways.
CASES: list[tuple[str, tuple[Any, ...], dict[str, Any], str | None, str, str, Any]] = [
    ("pos", ("The cat sat on the mat.",), {}, POS_MODEL, "POST", "/v1/pos",
     {"text": "The cat sat on the mat."}),
    ("pos", (), {"tokens": ["The", "dog", "barks", "."]}, POS_MODEL, "POST", "/v1/pos",
     {"tokens": ["The", "dog", "barks", "."]}),
    ("pos_batch", (["A red car.", ["She", "runs", "."]],), {}, POS_MODEL, "POST", "/v1/pos",
     {"inputs": [{"text": "A red car."}, {"tokens": ["She", "runs", "."]}]}),
    ("pos", ("The cat sat.",), {"scores": True}, POS_MODEL, "POST", "/v1/pos",
     {"text": "The cat sat.", "scores": True}),
    ("pos_batch", ([["She", "runs", "."]],), {"scores": True}, POS_MODEL, "POST", "/v1/pos",
     {"inputs": [{"tokens": ["She", "runs", "."], "scores": True}]}),
    ("polarity", (REVIEW,), {"model": POLARITY_MODEL}, POLARITY_MODEL, "POST",
     f"/v1/polarity?model={POLARITY_MODEL}", {"text": REVIEW}),
    ("polarity_batch", ([REVIEW, "Dull and far too long."],), {}, POLARITY_MODEL, "POST",
     "/v1/polarity", {"inputs": [{"text": REVIEW}, {"text": "Dull and far too long."}]}),
    ("detect", (ESSAY,), {}, DETECT_MODEL, "POST", "/v1/detect", {"text": ESSAY}),
    ("detect_batch", ([ESSAY, "because it is blue lol"],), {}, DETECT_MODEL, "POST",
     "/v1/detect", {"inputs": [{"text": ESSAY}, {"text": "because it is blue lol"}]}),
    ("detect", (ESSAY,), {"windows": True}, DETECT_MODEL, "POST", "/v1/detect",
     {"text": ESSAY, "windows": True}),
    ("qa", (QUESTION, CONTEXT), {}, QA_MODEL, "POST", "/v1/qa",
     {"question": QUESTION, "context": CONTEXT}),
    ("qa_batch", ([(QUESTION, CONTEXT), ("谁？", "蔡伦改进了造纸术。")],), {}, QA_MODEL, "POST",
     "/v1/qa", {"inputs": [{"question": QUESTION, "context": CONTEXT},
                           {"question": "谁？", "context": "蔡伦改进了造纸术。"}]}),
    ("qa", (QUESTION, CONTEXT), {"top_k": 3, "max_answer_length": 4}, QA_MODEL, "POST",
     "/v1/qa", {"question": QUESTION, "context": CONTEXT, "top_k": 3, "max_answer_length": 4}),
    ("qa_batch", ([(QUESTION, CONTEXT)],), {"top_k": 2}, QA_MODEL, "POST", "/v1/qa",
     {"inputs": [{"question": QUESTION, "context": CONTEXT, "top_k": 2}]}),
    ("explain_polarity", (REVIEW,), {"max_evals": 20}, POLARITY_MODEL, "POST",
     "/v1/polarity/explain", {"text": REVIEW, "max_evals": 20}),
    ("explain_detect", (ESSAY,), {"max_evals": 20}, DETECT_MODEL, "POST",
     "/v1/detect/explain", {"text": ESSAY, "max_evals": 20}),
    ("models", (), {}, None, "GET", "/v1/models", None),
    ("model", (POS_MODEL,), {}, POS_MODEL, "GET", f"/v1/models/{POS_MODEL}", None),
    ("healthz", (), {}, None, "GET", "/healthz", None),
    ("readyz", (), {}, None, "GET", "/readyz", None),
]  # fmt: skip


def _plain(result: Any) -> Any:
    """A result as its JSON body: dataclasses as dicts, tuples as lists, the fields an
    explanation's second computation changes (cached, seconds) and a None the server leaves
    out (Redis mode's fields of /readyz) dropped, floats rounded."""
    if isinstance(result, list):
        return [_plain(r) for r in result]
    doc = json.loads(json.dumps(dataclasses.asdict(result)))
    return _comparable(doc)


def _comparable(doc: Any) -> Any:
    if isinstance(doc, dict) and "outputs" in doc:
        doc = doc["outputs"]
    if isinstance(doc, list):
        return [_comparable(d) for d in doc]
    drop = {"cached", "seconds"}
    return rounded({k: v for k, v in doc.items() if k not in drop and v is not None})


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_every_method_answers_what_the_raw_http_call_does(srv, raw, model_repo, flavour):
    pytest.importorskip("shap", reason="the explain extra (shap) is not installed")
    for *_, model, _, _, _ in CASES:
        if model is not None:
            require_model(model_repo, model)
    expected = []
    for *_, verb, path, body in CASES:
        r = await raw.request(verb, path, json=body)
        assert r.status_code == 200, (path, r.text)
        expected.append(_comparable(r.json()))

    if flavour == "sync":

        def calls() -> list[Any]:
            with Client(srv.url, api_key=KEY) as c:
                return [getattr(c, name)(*a, **kw) for name, a, kw, *_ in CASES]

        got = await asyncio.to_thread(calls)
    else:
        async with AsyncClient(srv.url, api_key=KEY) as ac:
            got = [await getattr(ac, name)(*a, **kw) for name, a, kw, *_ in CASES]
    for case, want, result in zip(CASES, expected, got, strict=True):
        assert _plain(result) == want, case[0]
    assert type(got[0]).__name__ == "PosResult" and got[-4].explain.max_evals_limit > 0


def _doc_examples() -> list[str]:
    doc = (ROOT / "docs/service.md").read_text("utf-8")
    section = doc.split("\n## Python client\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)


async def test_the_documented_examples_run(srv, model_repo):
    """docs/service.md's examples, as written, against this server (its URL and key)."""
    for model in (POS_MODEL, POLARITY_MODEL, QA_MODEL):
        require_model(model_repo, model)
    examples = _doc_examples()
    assert len(examples) == 2

    def run(example: str) -> str:
        code = example.replace("http://127.0.0.1:8000", srv.url).replace(
            "api_key=None", f"api_key={KEY!r}"
        )
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, "docs/service.md", "exec"), {"__name__": "__main__"})
        return out.getvalue()

    said = await asyncio.to_thread(run, examples[0])
    assert said.startswith("PolarityResult(label=") and "('barks', " in said
    assert f"('{POS_MODEL}', '1')" in said and "422 empty_text" in said and "my-call-1" in said
    assert "my-call-2 {'tokenize': " in said and "'inference': " in said
    said = await asyncio.to_thread(run, examples[1])
    assert re.fullmatch(r"\['(positive|negative)', '(positive|negative)'\]\n200 True\n", said)


# --------------------------------------------------------------------------- errors
async def test_errors_carry_status_code_message_and_request_id(srv, raw):
    async with AsyncClient(srv.url, api_key=KEY, retry=QUICK) as c:
        before = await read_metrics(raw)
        with pytest.raises(ClientError) as e:
            await c.polarity("   ", request_id="my-call-1")
        err = e.value
        assert (err.status, err.code, err.request_id, err.attempts) == (
            422, "empty_text", "my-call-1", 1,
        )  # fmt: skip
        assert "visible text" in err.message and "my-call-1" in str(err)
        assert err.limit is None  # no limit refused it
        with pytest.raises(ClientError) as e:
            await c.polarity("fine", model="no-such-model")
        assert (e.value.status, e.value.code) == (404, "model_not_found")
        with pytest.raises(ClientError) as e:
            await c.polarity("fine", priority="urgent")
        assert (e.value.status, e.value.code) == (400, "invalid_header")
        assert "X-Priority" in e.value.message
        with pytest.raises(ClientError) as e:
            await c.model("nope")
        assert e.value.code == "model_not_found"
        # never retried: the server counted each refusal once
        after = await read_metrics(raw)
        refused = metric_value(after, "nlpserve_requests_total", status="422") - metric_value(
            before, "nlpserve_requests_total", status="422"
        )
        assert refused == 1


async def test_an_api_key_is_sent_and_a_missing_or_wrong_one_is_an_authentication_error(srv, raw):
    before = metric_value(await read_metrics(raw), "nlpserve_client_requests_total", client="alice")
    async with AsyncClient(srv.url, api_key=KEY) as c:
        assert (await c.pos("The dog barks.")).tags
    after = metric_value(await read_metrics(raw), "nlpserve_client_requests_total", client="alice")
    assert after == before + 1
    for key, code in ((None, "unauthorized"), ("not-a-key-of-this-server", "invalid_api_key")):
        with (
            Client(srv.url, api_key=key, retry=QUICK) as sync,
            pytest.raises(AuthenticationError) as e,
        ):
            await asyncio.to_thread(sync.pos, "The dog barks.")
        assert (e.value.status, e.value.code, e.value.attempts) == (401, code, 1)
        assert "X-API-Key" in e.value.message
    # the probes need no key
    with Client(srv.url) as anonymous:
        assert (await asyncio.to_thread(anonymous.healthz)).status == "ok"


async def test_a_deadline_is_sent_and_its_504_is_deadline_exceeded(srv):
    srv.queue.pause()  # nothing runs: the request waits in the queue till its deadline
    async with AsyncClient(srv.url, api_key=KEY, deadline_ms=300) as c:
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded) as e:
            await c.polarity("a film")
    assert (e.value.status, e.value.code, e.value.attempts) == (504, "deadline_exceeded", 1)
    assert 0.25 < time.monotonic() - t0 < 3


# --------------------------------------------------------------------------- retries
def _hold(raw: httpx.AsyncClient, n: int) -> list[asyncio.Task[httpx.Response]]:
    """``n`` requests of alice's that wait in the paused queue: her in-flight limit full."""
    return [
        asyncio.create_task(raw.post("/v1/polarity", json={"text": f"held {i}"})) for i in range(n)
    ]


async def _rejections(raw: httpx.AsyncClient) -> float:
    text = await read_metrics(raw)
    return metric_value(text, "nlpserve_client_quota_rejections_total", client="alice")


async def test_a_429_is_retried_after_its_retry_after(srv, raw):
    """The client's in-flight limit is full: 429 client_quota, Retry-After: 1. The client
    waits that second (not its 10 ms backoff) and its retry is served once the limit has
    room."""
    q = srv.queue
    q.pause()
    held = _hold(raw, LIMIT)
    await wait_for(lambda: q.depth(POLARITY_MODEL) == LIMIT)
    before = await _rejections(raw)
    async with AsyncClient(srv.url, api_key=KEY, retry=QUICK) as c:
        t0 = time.monotonic()
        call = asyncio.create_task(c.polarity(REVIEW, request_id="retried-call"))
        deadline = time.monotonic() + 10
        while await _rejections(raw) == before:  # the first attempt was refused
            assert time.monotonic() < deadline, "the call was never refused"
            await asyncio.sleep(0.01)
        q.resume()
        assert all(r.status_code == 200 for r in await asyncio.gather(*held))
        result = await call
    assert time.monotonic() - t0 >= 0.95  # Retry-After: 1, not QUICK's 10 ms backoff
    assert result.label in ("positive", "negative")
    assert await _rejections(raw) == before + 1  # one refusal, then served


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_a_429_that_lasts_exhausts_the_retries(srv, raw, flavour):
    q = srv.queue
    q.pause()
    held = _hold(raw, LIMIT)
    await wait_for(lambda: q.depth(POLARITY_MODEL) == LIMIT)
    policy = RetryPolicy(retries=1, backoff_s=0.01)
    t0 = time.monotonic()
    try:
        with pytest.raises(RetriesExhausted) as e:
            if flavour == "sync":
                with Client(srv.url, api_key=KEY, retry=policy) as c:
                    await asyncio.to_thread(c.polarity, "a film")
            else:
                async with AsyncClient(srv.url, api_key=KEY, retry=policy) as ac:
                    await ac.polarity("a film")
    finally:
        q.resume()
        await asyncio.gather(*held)
    err = e.value
    assert (err.status, err.code, err.retry_after, err.attempts) == (429, "client_quota", 1.0, 2)
    assert "limit for this client is 2" in err.message
    assert time.monotonic() - t0 >= 0.95


async def test_a_refused_connection_is_retried_until_the_server_listens(model_repo):
    """A replica restarting: its port refuses connections (bound, not yet listening), then
    it serves; the client's call, sent meanwhile, is answered."""
    settings = make_settings(model_repo, load_models=POS_MODEL)
    server = LiveServer(create_app(settings), settings)  # binds the port, listens at start()
    policy = RetryPolicy(retries=50, backoff_s=0.05, max_backoff_s=0.1)
    try:
        one_retry = RetryPolicy(retries=1, backoff_s=0.01)
        with Client(server.url, retry=one_retry) as c, pytest.raises(TransportError) as e:
            await asyncio.to_thread(c.pos, "The dog barks.")
        assert e.value.status is None and e.value.attempts == 2
        assert "Connect" in (e.value.code or "")

        async with AsyncClient(server.url, retry=policy) as ac:
            call = asyncio.create_task(ac.pos("The dog barks."))
            await asyncio.sleep(0.3)  # some attempts refused meanwhile
            assert not call.done()
            await server.start()
            result = await call
        assert result.tokens == ["The", "dog", "barks", "."]
    finally:
        await server.stop()  # closes the port's socket, started or not


# --------------------------------------------------------------------------- a result's answer
@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_a_result_carries_its_request_id_and_server_timing(srv, raw, model_repo, flavour):
    require_model(model_repo, POLARITY_MODEL)

    def sync_calls() -> list[Any]:
        with Client(srv.url, api_key=KEY) as c:
            return [
                c.polarity(REVIEW, request_id="meta-one"),
                c.polarity(REVIEW),
                c.polarity_batch([REVIEW, "Dull."], request_id="meta-batch"),
                c.models(),
            ]

    if flavour == "sync":
        one, minted, batch, listed = await asyncio.to_thread(sync_calls)
    else:
        async with AsyncClient(srv.url, api_key=KEY) as c:
            one = await c.polarity(REVIEW, request_id="meta-one")
            minted = await c.polarity(REVIEW)
            batch = await c.polarity_batch([REVIEW, "Dull."], request_id="meta-batch")
            listed = await c.models()
    assert one.meta is not None and (one.meta.request_id, one.meta.status) == ("meta-one", 200)
    assert set(one.meta.server_timing) == {"tokenize", "queue", "inference"}
    assert all(ms >= 0 for ms in one.meta.server_timing.values())
    assert one.meta.cache is None and one.meta.attempts == 1 and one.meta.elapsed_s > 0
    assert minted.meta is not None and len(minted.meta.request_id) >= 16
    assert [r.meta.request_id for r in batch if r.meta] == ["meta-batch"] * 2
    assert listed.meta is not None and listed.meta.server_timing == {}
    # outside the fields: the body and equality are the answer's alone
    assert "meta" not in dataclasses.asdict(one) and one == dataclasses.replace(one)


# --------------------------------------------------------------------------- any number of items
TEXTS = [REVIEW, "Dull and far too long.", "An ordinary film.", "Superb."]


async def _polarity_of(raw: httpx.AsyncClient) -> dict[str, Any]:
    body = {"inputs": [{"text": t} for t in TEXTS]}
    r = await raw.post("/v1/polarity", json=body, headers={"X-API-Key": FREE_KEY})
    assert r.status_code == 200
    return {t: _comparable(o) for t, o in zip(TEXTS, r.json()["outputs"], strict=True)}


async def _count(raw: httpx.AsyncClient, name: str, **labels: str) -> float:
    return metric_value(await read_metrics(raw), name, **labels)


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_many_items_go_in_requests_of_the_servers_limit_in_input_order(
    srv, raw, model_repo, flavour
):
    """150 texts, NLPSERVE_MAX_BATCH_ITEMS 64 (/v1/models' batch.max_items): requests of
    64, 64 and 22, never a 422; each result where its text was."""
    require_model(model_repo, POLARITY_MODEL)
    want = await _polarity_of(raw)
    texts = [TEXTS[i * 7 % len(TEXTS)] for i in range(150)]
    before = await _count(raw, "nlpserve_requests_total", status="422")
    if flavour == "sync":
        with Client(srv.url, api_key=FREE_KEY) as c:
            got = await asyncio.to_thread(c.polarity_many, texts, request_id="job")
            announced = c._learned.announced
    else:
        async with AsyncClient(srv.url, api_key=FREE_KEY) as ac:
            got = await ac.polarity_many(texts, request_id="job", concurrency=2)
            announced = ac._learned.announced
    assert announced == 64  # /v1/models' batch.max_items (not the document's, by path)
    assert [_plain(r) for r in got] == [want[t] for t in texts]
    ids = [r.meta.request_id for r in got if r.meta]
    assert sorted(set(ids)) == ["job.0-63", "job.128-149", "job.64-127"]
    assert await _count(raw, "nlpserve_requests_total", status="422") == before
    # what the client reads of the 422 when it has no document (the server's own words)
    async with AsyncClient(srv.url, api_key=FREE_KEY) as ac:
        with pytest.raises(ClientError) as e:
            await ac.polarity_batch(texts[:65])
    assert e.value.code == "too_many_items"
    assert e.value.limit == ErrorLimit("max_batch_items", 64)
    # what a server without the field says in words (the client's fallback reads them)
    assert [m[1] for p in calls._LIMITS if (m := p.search(e.value.message))] == ["64"]


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_many_items_keep_to_the_clients_in_flight_limit(srv, raw, model_repo, flavour):
    """carol may have 3 items in flight: a request of 4 is a 422 that says so, and a
    polarity_batch of 4 a ClientError; polarity_many cuts its requests to 3, and starts no
    two at once (which would be 429s, a second's wait each), the blocking client's threads
    as the async one's tasks."""
    require_model(model_repo, POLARITY_MODEL)
    want = await _polarity_of(raw)
    texts = TEXTS * 5
    quota = await _count(raw, "nlpserve_client_quota_rejections_total", client="carol")
    if flavour == "sync":
        with Client(srv.url, api_key=IN_FLIGHT_KEY, retry=QUICK) as c:
            with pytest.raises(ClientError) as e:
                await asyncio.to_thread(c.polarity_batch, TEXTS)
            many = functools.partial(c.polarity_many, concurrency=4)
            got = await asyncio.to_thread(many, texts, chunk_size=4, request_id="c")
            refused = await _count(raw, "nlpserve_requests_total", status="422")
            again = await asyncio.to_thread(many, texts)
    else:
        async with AsyncClient(srv.url, api_key=IN_FLIGHT_KEY, retry=QUICK) as ac:
            with pytest.raises(ClientError) as e:
                await ac.polarity_batch(TEXTS)
            got = await ac.polarity_many(texts, chunk_size=4, concurrency=4, request_id="c")
            refused = await _count(raw, "nlpserve_requests_total", status="422")
            again = await ac.polarity_many(texts, concurrency=4)
    assert (e.value.status, e.value.code) == (422, "too_many_items")
    assert "at most 3 in flight" in e.value.message and "smaller" in e.value.message
    assert e.value.limit == ErrorLimit("max_in_flight", 3)
    assert [_plain(r) for r in got] == [want[t] for t in texts]
    ids = sorted({r.meta.request_id for r in got if r.meta}, key=lambda i: int(i[2:].split("-")[0]))
    assert ids == [f"c.{a}-{min(a + 2, 19)}" for a in range(0, 20, 3)]  # 3 each, then 2
    # what it learned holds for the client's next call: no 422 more
    assert len(again) == 20
    assert await _count(raw, "nlpserve_requests_total", status="422") == refused
    quota_after = await _count(raw, "nlpserve_client_quota_rejections_total", client="carol")
    assert quota_after == quota


async def test_many_items_keep_to_the_clients_burst(srv, raw, model_repo):
    require_model(model_repo, POLARITY_MODEL)
    want = await _polarity_of(raw)
    with Client(srv.url, api_key=BURST_KEY, retry=QUICK) as c:
        with pytest.raises(ClientError) as e:
            await asyncio.to_thread(c.polarity_batch, TEXTS[:3])
        assert e.value.code == "too_many_items" and "at most 2 at once" in e.value.message
        assert e.value.limit == ErrorLimit("burst", 2)
        got = await asyncio.to_thread(c.polarity_many, TEXTS, request_id="d")
    assert [_plain(r) for r in got] == [want[t] for t in TEXTS]
    assert sorted({r.meta.request_id for r in got if r.meta}) == ["d.0-1", "d.2-3"]


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_calls_at_once_on_one_client_share_what_it_learned(srv, raw, model_repo, flavour):
    """carol may have 3 items in flight, across all her requests. Four polarity_many calls at
    once on one client (four threads of one Client, four tasks of one AsyncClient), 4
    requests at once each: each call's first request may be refused (422, before any call
    learned the limit), never a later one, and no 429 client_quota ever: the calls keep
    together to the limit one of them learned, one request of 3 at a time (each on its own
    would have 3 in flight). Four more calls, once it is learned: no 422 at all. Every item
    answered, in input order."""
    require_model(model_repo, POLARITY_MODEL)
    want = await _polarity_of(raw)
    texts = [TEXTS[i * 3 % len(TEXTS)] for i in range(30)]
    calls_at_once = 4

    async def counts() -> tuple[float, float]:
        refused = await _count(raw, "nlpserve_requests_total", status="422")
        quota = await _count(raw, "nlpserve_client_quota_rejections_total", client="carol")
        return refused, quota

    def threads(c: Client, prefix: str) -> list[list[Any]]:
        start = threading.Barrier(calls_at_once)

        def one(k: int) -> list[Any]:
            start.wait()
            return c.polarity_many(texts, concurrency=4, request_id=f"{prefix}{k}")

        with ThreadPoolExecutor(calls_at_once) as pool:
            return list(pool.map(one, range(calls_at_once)))

    async def tasks(ac: AsyncClient, prefix: str) -> list[list[Any]]:
        return await asyncio.gather(*(
            ac.polarity_many(texts, concurrency=4, request_id=f"{prefix}{k}")
            for k in range(calls_at_once)
        ))  # fmt: skip

    before = await counts()
    if flavour == "sync":
        with Client(srv.url, api_key=IN_FLIGHT_KEY, retry=QUICK) as c:
            first = await asyncio.to_thread(threads, c, "a")
            learned = await counts()
            second = await asyncio.to_thread(threads, c, "b")
    else:
        async with AsyncClient(srv.url, api_key=IN_FLIGHT_KEY, retry=QUICK) as ac:
            first = await tasks(ac, "a")
            learned = await counts()
            second = await tasks(ac, "b")
    after = await counts()
    for got in first + second:
        assert [_plain(r) for r in got] == [want[t] for t in texts]
        for rid in {r.meta.request_id for r in got if r.meta}:
            a, b = rid.split(".", 1)[1].split("-")
            assert int(b) - int(a) + 1 <= 3, rid  # no request over the limit was answered
    assert 1 <= learned[0] - before[0] <= calls_at_once  # at most each call's first request
    assert after[0] == learned[0]  # once learned, never a 422
    assert after[1] == before[1]  # never over the in-flight limit: no 429 client_quota


# QA contexts of 1, 2 and 5 windows (qa-zh's; max_request_sequences 4 below)
CAPITAL = "中国的首都是北京，它有三千多年的历史。"
ONE_WINDOW, TWO_WINDOWS, FIVE_WINDOWS = CAPITAL, CAPITAL * 4, CAPITAL * 10


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_many_halves_a_request_of_too_many_qa_windows_for_that_call_only(model_repo, flavour):
    """NLPSERVE_MAX_REQUEST_SEQUENCES 4 and NLPSERVE_MAX_BATCH_ITEMS 4: four 2-window
    contexts in one request are 8 sequences, a 422 input_too_long whose ``limit`` (4) counts
    sequences, not items: cut to 4 items it would be refused again; halved, it passes. The
    next call's short contexts go 4 to a request again (the size is those texts', not the
    path's); a context of 5 windows alone stops the call with its error."""
    require_model(model_repo, QA_MODEL)
    pairs = [("首都？", TWO_WINDOWS)] * 4 + [("历史？", ONE_WINDOW)] * 4
    # fp32: int8 scales its activations per batch, so a context's scores batched with others
    # moved from its scores alone (0.1412 vs 0.1415 once, under load)
    settings = make_settings(model_repo, max_request_sequences=4, max_batch_items=4, variant="fp32")
    async with live_server(settings) as srv:

        def calls_of(c: Client) -> tuple[list[Any], list[Any], list[Any], IncompleteBatch]:
            singles = [c.qa(q, ctx) for q, ctx in pairs]
            got = c.qa_many(pairs, request_id="long")
            later = c.qa_many(pairs[4:], request_id="short")
            with pytest.raises(IncompleteBatch) as e:
                c.qa_many([pairs[4], ("首都？", FIVE_WINDOWS)])
            return singles, got, later, e.value

        if flavour == "sync":
            with Client(srv.url, retry=QUICK) as c:
                singles, got, later, stopped = await asyncio.to_thread(calls_of, c)
        else:
            async with AsyncClient(srv.url, retry=QUICK) as ac:
                singles = [await ac.qa(q, ctx) for q, ctx in pairs]
                got = await ac.qa_many(pairs, request_id="long", concurrency=4)
                later = await ac.qa_many(pairs[4:], request_id="short", concurrency=4)
                with pytest.raises(IncompleteBatch) as e:
                    await ac.qa_many([pairs[4], ("首都？", FIVE_WINDOWS)])
                stopped = e.value
    assert [_plain(r) for r in got] == [_plain(r) for r in singles]
    ids = sorted({r.meta.request_id for r in got if r.meta})
    assert ids == ["long.0-1", "long.2-3", "long.4-5", "long.6-7"]
    assert {r.meta.request_id for r in later if r.meta} == {"short.0-3"}
    assert (stopped.status, stopped.code) == (422, "input_too_long")
    assert stopped.limit == ErrorLimit("max_request_sequences", 4)
    assert stopped.failed == range(1, 2) and stopped.unanswered == [1]


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_a_client_rate_429_waits_its_retry_after(srv, raw, model_repo, flavour):
    """frank may send one item a second: his second call at once is a 429 client_rate with
    Retry-After: 1, waited out (not QUICK's 10 ms backoff), then served."""
    require_model(model_repo, POLARITY_MODEL)
    before = await _count(raw, "nlpserve_client_rate_rejections_total", client="frank")
    await asyncio.sleep(1.1)  # the bucket full again after any earlier test's call

    def sync_calls() -> list[Any]:
        with Client(srv.url, api_key=RATE_KEY, retry=QUICK) as c:
            return [c.polarity(REVIEW), c.polarity(REVIEW)]

    t0 = time.monotonic()
    if flavour == "sync":
        first, second = await asyncio.to_thread(sync_calls)
    else:
        async with AsyncClient(srv.url, api_key=RATE_KEY, retry=QUICK) as ac:
            first, second = await ac.polarity(REVIEW), await ac.polarity(REVIEW)
    assert time.monotonic() - t0 >= 0.95
    assert first.meta and first.meta.attempts == 1 and second.meta and second.meta.attempts == 2
    after = await _count(raw, "nlpserve_client_rate_rejections_total", client="frank")
    assert after == before + 1


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_a_failed_request_stops_many_with_the_results_so_far(srv, model_repo, flavour):
    require_model(model_repo, POLARITY_MODEL)
    texts = TEXTS * 2 + ["   ", REVIEW, REVIEW, REVIEW]  # items 8-11: one empty text
    texts += TEXTS * 2
    if flavour == "sync":
        with Client(srv.url, api_key=FREE_KEY) as c, pytest.raises(IncompleteBatch) as e:
            await asyncio.to_thread(c.polarity_many, texts, chunk_size=4, concurrency=1)
    else:
        async with AsyncClient(srv.url, api_key=FREE_KEY) as ac:
            with pytest.raises(IncompleteBatch) as e:
                await ac.polarity_many(texts, chunk_size=4, concurrency=1, request_id="f")
    err = e.value
    assert isinstance(err.error, ClientError) and err.__cause__ is err.error
    assert (err.status, err.code, err.failed) == (422, "empty_text", range(8, 12))
    assert err.unanswered == list(range(8, 20))
    assert all(r is not None for r in err.results[:8]) and len(err.results) == 20
    assert "items 8-11" in str(err)
    if flavour == "async":
        assert err.request_id == "f.8-11"


# --------------------------------------------------------------------------- a raw server
class Scripted:
    """A raw HTTP/1.1 server answering each request with the next scripted response (None:
    no answer at all, the connection held open), recording each request's headers."""

    def __init__(self, responses: list[bytes | None]) -> None:
        self.responses = iter(responses)
        self.seen: list[dict[str, str]] = []
        self.bodies: list[bytes] = []
        self.times: list[float] = []
        self.server: asyncio.Server | None = None
        self.handlers: set[asyncio.Task[None]] = set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if (task := asyncio.current_task()) is not None:
            self.handlers.add(task)
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in head.split("\r\n")[1:])
                    if k
                }
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                self.seen.append(headers)
                self.bodies.append(body)
                self.times.append(time.monotonic())
                resp = await self.respond(head.split(" ", 2)[1], body)
                if resp is None:
                    await asyncio.sleep(3600)  # cancelled when the server closes
                    return
                writer.write(resp)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def respond(self, path: str, body: bytes) -> bytes | None:
        return next(self.responses, None)

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.handlers:  # the connections held open (Server.close_clients: 3.13)
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        await self.server.wait_closed()


def answer(status: int, body: bytes, **headers: str) -> bytes:
    head = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    return (
        f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n{head}"
        "Content-Type: application/json\r\n\r\n"
    ).encode() + body


def api_error(
    status: int, code: str, message: str, limit: dict[str, Any] | None = None, **headers: str
) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message}
    if limit is not None:
        error["limit"] = limit
    return answer(status, json.dumps({"error": error}).encode(), **headers)


OK = answer(200, b'{"label": "positive", "positive_probability": 0.9, "truncated": false}')


async def test_retries_keep_the_request_id_honour_retry_after_and_send_the_time_left():
    script = Scripted([
        api_error(503, "backend_unavailable", "redis down", Retry_After="0.3"),
        answer(502, b"<html>502 Bad Gateway</html>"),
        OK,
    ])  # fmt: skip
    async with script as url, AsyncClient(url, retry=QUICK, deadline_ms=5000) as c:
        result = await c.polarity("fine", priority="batch")
    assert result.positive_probability == 0.9
    ids = {h["x-request-id"] for h in script.seen}
    assert len(ids) == 1 and len(script.seen) == 3  # one call, one id, three attempts
    assert len(script.handlers) == 1  # over one kept-alive connection
    assert script.times[1] - script.times[0] >= 0.3  # Retry-After honoured
    assert script.times[2] - script.times[1] < 0.3  # no Retry-After: the short backoff
    left = [int(h["x-deadline-ms"]) for h in script.seen]
    assert 5000 >= left[0] > left[1] > left[2] and left[0] - left[1] >= 300
    assert {h["x-priority"] for h in script.seen} == {"batch"}
    assert script.seen[0]["user-agent"].startswith("nlpserve-client/")


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_a_gateway_error_that_lasts_is_retries_exhausted(flavour):
    script = Scripted([answer(502, b"<html>502 Bad Gateway</html>")] * 4)
    async with script as url:
        with pytest.raises(RetriesExhausted) as e:
            if flavour == "sync":
                with Client(url, retry=QUICK) as c:
                    await asyncio.to_thread(c.detect, "text")
            else:
                async with AsyncClient(url, retry=QUICK) as ac:
                    await ac.detect("text")
    err = e.value
    assert (err.status, err.code, err.attempts) == (502, "http_502", 4)
    assert len(script.handlers) == 1  # the sync client keeps its connection too
    assert "Bad Gateway" in err.message
    assert err.request_id == script.seen[0]["x-request-id"]


async def test_no_retry_waits_past_the_total_time_or_the_deadline():
    long_wait = api_error(429, "queue_full", "full", Retry_After="5")
    for policy, deadline in ((RetryPolicy(max_total_s=1.0), None), (RetryPolicy(), 1000)):
        script = Scripted([long_wait, OK])
        async with script as url, AsyncClient(url, retry=policy, deadline_ms=deadline) as c:
            t0 = time.monotonic()
            with pytest.raises(RetriesExhausted) as e:
                await c.polarity("fine")
        assert time.monotonic() - t0 < 1.0  # gave up at once: its wait would overrun
        assert (e.value.code, e.value.retry_after, e.value.attempts) == ("queue_full", 5.0, 1)


async def test_a_504_and_other_4xx_are_not_retried_and_a_missing_answer_is_a_deadline():
    script = Scripted([
        api_error(504, "deadline_exceeded", "not served in time"),
        api_error(413, "body_too_large", "too big"),
        None,  # never answered
    ])  # fmt: skip
    async with script as url, AsyncClient(url, retry=QUICK) as c:
        with pytest.raises(DeadlineExceeded) as e:
            await c.qa("q", "c")
        assert (e.value.status, e.value.attempts) == (504, 1)
        with pytest.raises(ClientError) as ce:
            await c.qa("q", "c")
        assert (ce.value.status, ce.value.code) == (413, "body_too_large")
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded) as e:
            await c.qa("q", "c", deadline_ms=200)  # no answer: the call ends at its deadline
        assert e.value.status is None and "deadline" in e.value.message
        assert time.monotonic() - t0 < 200 / 1000 + 2  # DEADLINE_GRACE_S after it
    assert len(script.seen) == 3


async def test_a_body_the_client_cannot_read_is_a_server_error():
    script = Scripted([answer(200, b'{"unexpected": true}')])
    async with script as url, AsyncClient(url) as c:
        with pytest.raises(NlpserveError) as e:
            await c.pos("x")
    assert e.value.status == 200 and "cannot read" in e.value.message


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_an_answer_httpx_cannot_decode_is_a_server_error(flavour):
    """A body its Content-Encoding does not describe (a broken proxy's gzip): httpx raises
    DecodingError, no httpx.TransportError, which left the client as itself, past an ``except
    NlpserveError``. It is the ServerError of an answer the client cannot read, not retried."""
    script = Scripted([answer(200, b"not gzip", Content_Encoding="gzip"), OK])
    async with script as url:
        with pytest.raises(NlpserveError) as e:
            if flavour == "sync":
                with Client(url, retry=QUICK) as c:
                    await asyncio.to_thread(c.polarity, "fine", request_id="gz")
            else:
                async with AsyncClient(url, retry=QUICK) as ac:
                    await ac.polarity("fine", request_id="gz")
    err = e.value
    assert type(err) is ServerError and isinstance(err.__cause__, httpx.DecodingError)
    assert (err.status, err.code, err.request_id, err.attempts) == (None, "DecodingError", "gz", 1)
    assert "cannot read" in err.message
    assert len(script.seen) == 1


async def test_a_429_the_policy_does_not_retry_is_still_no_client_error():
    # the one 4xx that is not the request's fault: never a ClientError ("fix the request"),
    # whatever statuses the policy retries
    script = Scripted([api_error(429, "rate_limited", "slow down", Retry_After="1")])
    policy = RetryPolicy(retry_statuses=frozenset({502, 503}))
    async with script as url, AsyncClient(url, retry=policy) as c:
        with pytest.raises(RetriesExhausted) as e:
            await c.polarity("fine")
    assert not isinstance(e.value, ClientError)
    assert (e.value.status, e.value.code, e.value.retry_after) == (429, "rate_limited", 1.0)


async def test_without_a_deadline_an_attempt_outlasts_the_servers_default_deadline():
    # the server answers 504 at its default deadline: that answer arrives before the
    # client's timeout (a timeout would be a TransportError, and retried)
    from service.client._calls import DEADLINE_GRACE_S
    from service.config import Settings

    server_s = Settings.model_fields["default_deadline_ms"].default / 1000
    with Client("http://127.0.0.1:1") as sync:
        async with AsyncClient("http://127.0.0.1:1") as asynchronous:
            clients: list[Client | AsyncClient] = [sync, asynchronous]
    for c in clients:
        assert c._attempts(calls.polarity("x", None), {}).request()["timeout"] >= (
            server_s + DEADLINE_GRACE_S
        )
        with_deadline = c._attempts(calls.polarity("x", None), {"deadline_ms": 2000})
        assert with_deadline.request()["timeout"] <= 2 + DEADLINE_GRACE_S


def outputs(*probabilities: float) -> bytes:
    out = [
        {"label": "positive", "positive_probability": p, "truncated": False} for p in probabilities
    ]
    return answer(200, json.dumps({"outputs": out}).encode())


# A server that announces no batch limit: a 404 for /v1/models, then for /openapi.json.
NO_LIMITS = [api_error(404, "not_found", "no such path")] * 2


async def test_without_an_openapi_document_many_learns_the_limits_from_refusals():
    """No /v1/models nor /openapi.json (404s): the first request holds every item; its 422
    names the limit (2: in words, as a server without the ``limit`` field does), a 413 halves
    what it refused; the results in input order all the same."""
    script = Scripted([
        *NO_LIMITS,
        api_error(422, "too_many_items",
                  "5 inputs in one request; the limit is 2 (NLPSERVE_MAX_BATCH_ITEMS)"),
        outputs(0.0, 0.1),
        api_error(413, "body_too_large", "too big"),
        outputs(0.2),
        outputs(0.3),
        outputs(0.4),
    ])  # fmt: skip
    async with script as url, AsyncClient(url, retry=QUICK) as c:
        got = await c.polarity_many(list("abcde"), concurrency=1)
    assert [r.positive_probability for r in got] == [0.0, 0.1, 0.2, 0.3, 0.4]
    sent = [len(json.loads(b)["inputs"]) for b in script.bodies[2:]]
    assert sent == [5, 2, 2, 1, 1, 1]


async def test_server_timing_with_the_response_cache():
    timing = "cache;desc=partial;dur=0.050, tokenize;dur=0.174, queue;dur=0.702, inference;dur=2"
    script = Scripted([answer(200, OK.split(b"\r\n\r\n", 1)[1], Server_Timing=timing)])
    async with script as url, AsyncClient(url) as c:
        result = await c.polarity("fine")
    assert result.meta is not None and result.meta.cache == "partial"
    assert result.meta.server_timing == {
        "cache": 0.05, "tokenize": 0.174, "queue": 0.702, "inference": 2.0,
    }  # fmt: skip


async def test_many_cuts_to_the_limit_field_whatever_the_message_says():
    """A 422 with ``limit`` (max_in_flight 3) in words no pattern reads: the requests are cut
    to 3 (halving would send 4), and as an in-flight limit it keeps AsyncClient to one request
    of 3 at a time. A limit this client does not know halves, whatever number the message
    holds: the field, where there is one, is what the client reads."""
    words = "trop d'éléments pour ce client"
    script = Scripted([
        *NO_LIMITS,
        api_error(422, "too_many_items", words, {"name": "max_in_flight", "value": 3}),
        outputs(0.0, 0.1, 0.2),
        outputs(0.3, 0.4, 0.5),
        outputs(0.6, 0.7, 0.8),
    ])  # fmt: skip
    async with script as url, AsyncClient(url, retry=QUICK) as c:
        got = await c.polarity_many(list("abcdefghi"), concurrency=4)
        assert [round(r.positive_probability, 1) for r in got] == [i / 10 for i in range(9)]
        assert [len(json.loads(b)["inputs"]) for b in script.bodies[2:]] == [9, 3, 3, 3]
        assert c._learned.in_flight == 3

    unknown = {"name": "max_tokens", "value": 3}
    script = Scripted([
        *NO_LIMITS,
        api_error(422, "too_many_items", "at most 3 at once; the limit is 3", unknown),
        outputs(*[0.5] * 4),
        outputs(*[0.5] * 4),
        outputs(0.5),
    ])  # fmt: skip
    async with script as url, AsyncClient(url, retry=QUICK) as c:
        assert len(await c.polarity_many(list("abcdefghi"), concurrency=1)) == 9
    assert [len(json.loads(b)["inputs"]) for b in script.bodies[2:]] == [9, 4, 4, 1]


async def test_an_error_carries_its_limit_and_ignores_one_it_cannot_read():
    limit = {"name": "max_in_flight", "value": 3}
    script = Scripted([
        api_error(422, "too_many_items", "words", limit),
        api_error(429, "client_rate", "slow down", {"name": "rate", "value": 0.5}),
        api_error(422, "too_many_items", "words", {"name": "burst", "value": "3"}),
        api_error(422, "too_many_items", "words", {"name": "burst", "value": True}),
        api_error(413, "body_too_large", "words", [1]),  # type: ignore[arg-type]
    ])  # fmt: skip
    async with script as url, AsyncClient(url, retry=RetryPolicy(retries=0)) as c:
        with pytest.raises(ClientError) as e:
            await c.polarity_batch(["a", "b", "c", "d"])
        assert e.value.limit == ErrorLimit("max_in_flight", 3) and e.value.message == "words"
        with pytest.raises(RetriesExhausted) as r:
            await c.polarity("a")
        assert r.value.limit == ErrorLimit("rate", 0.5)
        for _ in range(3):  # the error all the same, without a limit
            with pytest.raises(ClientError) as e:
                await c.polarity("a")
            assert e.value.code in ("too_many_items", "body_too_large") and e.value.limit is None


class Echoing(Scripted):
    """A server of ``/v1/models`` (``batch.max_items`` ``batch``; None: none, as a server
    older than the field), ``/openapi.json`` (``maxItems`` 5 of ``/v1/polarity``'s inputs) and
    polarity batches, each text ``"<n>"`` answered ``positive_probability`` n/100 after
    ``delay_s``; it counts the requests under way, the most at once, and the reads of the
    models and of the document."""

    SCHEMA = {"properties": {"inputs": {"maxItems": 5}}}
    LIMITS = {"paths": {"/v1/polarity": {"post": {"requestBody": {"content": {
        "application/json": {"schema": SCHEMA}}}}}}}  # fmt: skip

    def __init__(
        self, delay_s: float, batch: int | None = None, in_flight: int | None = None
    ) -> None:
        super().__init__([])
        self.delay_s = delay_s
        self.batch = batch
        self.in_flight = in_flight  # a request of more items: 422, as over a max_in_flight
        self.under_way = self.most = self.models = self.documents = 0

    async def respond(self, path: str, body: bytes) -> bytes | None:
        if path == "/v1/models":
            self.models += 1
            doc: dict[str, Any] = {
                "models": [],
                "explain": {"max_evals_default": 1, "max_evals_limit": 1},
            }
            if self.batch is not None:
                doc["batch"] = {"max_items": self.batch}
            return answer(200, json.dumps(doc).encode())
        if path == "/openapi.json":
            self.documents += 1
            return answer(200, json.dumps(self.LIMITS).encode())
        inputs = json.loads(body)["inputs"]
        if self.in_flight is not None and len(inputs) > self.in_flight:
            limit = {"name": "max_in_flight", "value": self.in_flight}
            return api_error(422, "too_many_items", "too many", limit)
        self.under_way += 1
        self.most = max(self.most, self.under_way)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.under_way -= 1
        return outputs(*[int(i["text"]) / 100 for i in inputs])


@pytest.mark.parametrize("batch", [4, None])
async def test_many_reads_the_limit_in_models_and_the_document_only_from_an_older_server(batch):
    """``GET /v1/models``' ``batch.max_items`` (a few hundred bytes) sizes the requests; the
    OpenAPI document (~200 KB) is read only where it lacks the field (a server older than it).
    Once per client, whatever its calls."""
    script = Echoing(delay_s=0, batch=batch)
    async with script as url, AsyncClient(url, retry=QUICK) as c:
        for _ in range(2):
            got = await c.polarity_many([str(i) for i in range(12)], concurrency=1)
            assert [r.positive_probability for r in got] == [i / 100 for i in range(12)]
        models = await c.models()
    assert (script.models, script.documents) == (2, 0 if batch else 1)  # 2: one is models()
    assert models.batch == (None if batch is None else BatchLimits(batch))
    sizes = [len(json.loads(b)["inputs"]) for b in script.bodies if b]
    assert sizes == ([4, 4, 4] if batch else [5, 5, 2]) * 2


@pytest.mark.parametrize("concurrency", [1, 3])
async def test_the_blocking_clients_many_sends_concurrency_requests_at_once(concurrency):
    """40 texts, 5 a request (the document's maxItems): the first request alone (its size
    not yet accepted), then ``concurrency`` at once, never more; the results in input order
    however the answers interleave; each request its own id."""
    texts = [str(i) for i in range(40)]
    script = Echoing(delay_s=0.1)
    async with script as url:
        with Client(url, retry=QUICK) as c:
            many = functools.partial(c.polarity_many, concurrency=concurrency)
            got = await asyncio.to_thread(many, texts, request_id="j")
            with pytest.raises(ValueError, match="concurrency must be 1 or more"):
                c.polarity_many(texts, concurrency=0)
    assert [r.positive_probability for r in got] == [i / 100 for i in range(40)]
    assert script.most == concurrency
    ids = [h["x-request-id"] for h in script.seen[2:]]
    assert sorted(ids) == sorted(f"j.{a}-{a + 4}" for a in range(0, 40, 5))
    assert ids[0] == "j.0-4"  # alone: sent before any other


async def test_threads_of_one_client_read_the_document_once():
    """Four threads start polarity_many at once on a new Client of an older server (no
    ``batch`` in /v1/models): one read of each, /v1/models and /openapi.json, between them
    (each call read them, while none had yet), and every request within maxItems (5)."""
    script = Echoing(delay_s=0.02)
    start = threading.Barrier(4)

    def one(c: Client, k: int) -> list[Any]:
        start.wait()
        return c.polarity_many([str(i) for i in range(20)], request_id=f"r{k}")

    async with script as url:
        with Client(url, retry=QUICK) as c, ThreadPoolExecutor(4) as pool:
            got = await asyncio.to_thread(
                lambda: list(pool.map(functools.partial(one, c), range(4)))
            )
    assert (script.models, script.documents) == (1, 1)  # an older server: no batch field
    assert all([r.positive_probability for r in g] == [i / 100 for i in range(20)] for g in got)
    assert all(len(json.loads(b)["inputs"]) <= 5 for b in script.bodies if b)


async def test_a_cancelled_many_leaves_nothing_in_flight_for_the_next_call():
    """A polarity_many cancelled with a request under way (its in-flight limit of 3 learned):
    its items leave the client's count, which every call keeps to; else the next call would
    wait forever for room that never comes."""
    texts = [str(i) for i in range(12)]
    script = Echoing(delay_s=0.5, in_flight=3)
    async with script as url, AsyncClient(url, retry=QUICK) as c:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(c.polarity_many(texts, concurrency=4), 0.3)
        assert c._learned.in_flight == 3
        got = await asyncio.wait_for(c.polarity_many(texts[:6], concurrency=4), 5)
    assert [r.positive_probability for r in got] == [i / 100 for i in range(6)]


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_a_small_call_beside_a_long_one_does_not_wait_for_all_of_it(flavour):
    """The client's in-flight limit (4, learned) is shared by its calls: a call of 2 items
    starts once 2 are free, and one whose items are all answered returns, rather than waiting
    for room for a whole request of the limit's size, which a long call of requests of 2
    (2 under way at a time, each end refilled at once) leaves only as it ends."""
    script = Echoing(delay_s=0.05, in_flight=4)
    long_texts = [str(i) for i in range(60)]
    async with script as url:
        if flavour == "async":
            async with AsyncClient(url, retry=QUICK) as c:
                await c.polarity_many([str(i) for i in range(12)], concurrency=1)
                assert c._learned.in_flight == 4
                long = asyncio.create_task(c.polarity_many(long_texts, chunk_size=2, concurrency=4))
                await asyncio.sleep(0.15)
                short = await asyncio.wait_for(c.polarity_many(["1", "2"], concurrency=4), 5)
                assert not long.done()  # answered while the long call still runs
                got = await long
        else:
            with Client(url, retry=QUICK) as sc:
                await asyncio.to_thread(sc.polarity_many, [str(i) for i in range(12)])
                long_call = functools.partial(
                    sc.polarity_many, long_texts, chunk_size=2, concurrency=4
                )
                long = asyncio.ensure_future(asyncio.to_thread(long_call))
                await asyncio.sleep(0.15)
                short = await asyncio.to_thread(sc.polarity_many, ["1", "2"], concurrency=4)
                assert not long.done()
                got = await long
    assert [r.positive_probability for r in short] == [0.01, 0.02]
    assert [r.positive_probability for r in got] == [i / 100 for i in range(60)]


async def test_a_many_cancelled_as_its_request_ends_leaves_nothing_in_flight():
    """A worker whose request just ended waits for the client's lock (the woken waiters of
    every call take it in turn) and is cancelled there: its items still leave the client's
    count in flight, else every later call would wait for room that never comes."""
    script = Echoing(delay_s=0.2, in_flight=3)
    async with script as url, AsyncClient(url, retry=QUICK) as c:
        await c.polarity_many([str(i) for i in range(6)], concurrency=1)
        assert c._learned.in_flight == 3
        call = asyncio.create_task(c.polarity_many(["1", "2", "3"], concurrency=1))
        await wait_for(lambda: script.under_way == 1)
        async with c._room:  # held as the answer comes: the worker waits for it
            await wait_for(lambda: script.under_way == 0)
            await asyncio.sleep(0.05)
            call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert c._learned.busy == 0
        got = await asyncio.wait_for(c.polarity_many(["4", "5"], concurrency=2), 5)
    assert [r.positive_probability for r in got] == [0.04, 0.05]


class Poisoned(list[str]):
    """Texts whose slice from item 20 on raises: an exception of the caller's, not an answer."""

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice) and i.start == 20:
            raise RuntimeError("poisoned")
        return super().__getitem__(i)


async def test_an_exception_in_one_thread_of_many_stops_the_others_and_is_raised():
    """The thread that meets it raises it from the call; no request starts after it (those
    under way end), rather than the other threads sending the rest."""
    script = Echoing(delay_s=0.05)
    async with script as url:
        with Client(url, retry=QUICK) as c:
            many = functools.partial(c.polarity_many, concurrency=3)
            with pytest.raises(RuntimeError, match="poisoned"):
                await asyncio.to_thread(many, Poisoned(str(i) for i in range(40)), request_id="p")
    ids = {h["x-request-id"] for h in script.seen[2:]}
    assert {"p.0-4", "p.5-9", "p.10-14", "p.15-19"} <= ids and "p.35-39" not in ids


async def test_the_options_of_qa_and_detect_reach_their_results(srv, model_repo):
    """qa's top_k and max_answer_length (qa_many's too), detect's windows: their results'
    answers and windows as the client's dataclasses."""
    require_model(model_repo, QA_MODEL)
    require_model(model_repo, DETECT_MODEL)
    async with AsyncClient(srv.url, api_key=KEY) as ac:
        one = await ac.qa(QUESTION, CONTEXT, top_k=3)
        plain = await ac.qa(QUESTION, CONTEXT)
        many = await ac.qa_many([(QUESTION, CONTEXT)] * 3, top_k=2, max_answer_length=1)
        whole = await ac.detect(" ".join([ESSAY] * 20), windows=True)
        head = await ac.detect(" ".join([ESSAY] * 20))
    assert plain.answers is None
    assert one.answers and all(isinstance(a, QASpan) for a in one.answers)
    assert (one.answers[0].answer, one.answers[0].start) == (plain.answer, plain.start)
    for r in many:
        assert r.answers and len(r.answers) <= 2
        assert all(a.end - a.start <= 1 for a in r.answers)  # one CJK character, one token
    assert head.windows is None and head.truncated and not whole.truncated
    assert whole.windows and len(whole.windows) > 1
    assert all(isinstance(w, DetectWindow) for w in whole.windows)

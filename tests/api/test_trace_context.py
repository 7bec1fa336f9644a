"""W3C Trace Context (service/tracecontext.py): a request joins its caller's trace, answers
with its own span id, logs both ids, and a sampled request's latency carries an exemplar."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from service.logs import JsonFormatter
from service.tracecontext import TRACESTATE_MAX
from tests.service_support import (
    POLARITY_MODEL,
    diverged_detector_repo,
    live_server,
    make_settings,
    require_model,
)
from tests.test_tracecontext import INVALID, PARENT_ID, SAMPLED, TRACE_ID, UNSAMPLED

pytestmark = pytest.mark.asyncio(loop_scope="session")

_RESPONSE = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-(0[01])")


def answered_trace(r: httpx.Response) -> tuple[str, str, str]:
    """(trace id, span id, flags) of a response's traceparent, which must be well-formed."""
    m = _RESPONSE.fullmatch(r.headers.get("traceparent", ""))
    assert m, r.headers
    return m[1], m[2], m[3]


# ------------------------------------------------------------------ over HTTP
@pytest.fixture(autouse=True)
def _needs_models(model_repo):
    require_model(model_repo, POLARITY_MODEL)


async def test_a_valid_traceparent_is_continued_with_a_span_of_ours(client):
    for sent, flags in ((SAMPLED, "01"), (UNSAMPLED, "00")):
        r = await client.post("/v1/polarity", json={"text": "good"}, headers={"traceparent": sent})
        assert r.status_code == 200, r.text
        trace_id, span_id, got_flags = answered_trace(r)
        assert (trace_id, got_flags) == (TRACE_ID, flags)  # the caller's trace and decision
        assert span_id != PARENT_ID  # the service's own span, a child of the caller's
    # a later version is answered in version 00, the one this service speaks
    later = f"cc-{TRACE_ID}-{PARENT_ID}-01-more"
    r = await client.post("/v1/polarity", json={"text": "good"}, headers={"traceparent": later})
    assert answered_trace(r)[0] == TRACE_ID and r.headers["traceparent"].startswith("00-")


async def test_every_request_gets_its_own_span(client):
    spans = set()
    for _ in range(3):
        r = await client.post(
            "/v1/polarity", json={"text": "good"}, headers={"traceparent": SAMPLED}
        )
        spans.add(answered_trace(r)[1])
    assert len(spans) == 3


@pytest.mark.parametrize("value", INVALID.values(), ids=list(INVALID))
async def test_an_invalid_traceparent_restarts_the_trace(client, value):
    r = await client.post(
        "/v1/polarity",
        json={"text": "good"},
        headers={"traceparent": value, "tracestate": "vendor=x"},
    )
    assert r.status_code == 200, r.text  # ignored, never an error
    trace_id, span_id, flags = answered_trace(r)
    assert trace_id != TRACE_ID and trace_id != "0" * 32
    assert flags == "00"  # a trace started here is not sampled: nothing records it
    assert "tracestate" not in r.headers  # it belongs to the trace that was not continued


async def test_no_traceparent_starts_a_new_trace(client):
    first = answered_trace(await client.post("/v1/polarity", json={"text": "good"}))
    second = answered_trace(await client.post("/v1/polarity", json={"text": "good"}))
    assert first[0] != second[0] and first[2] == second[2] == "00"


async def test_two_traceparent_lines_are_invalid(service):
    """Two lines (which a server may join with a comma) cannot be one trace."""
    other = f"00-{'a' * 32}-{PARENT_ID}-01"
    async with service.client() as c:
        r = await c.post(
            "/v1/polarity",
            json={"text": "good"},
            headers=[("traceparent", SAMPLED), ("traceparent", other)],
        )
    assert r.status_code == 200 and answered_trace(r)[0] not in (TRACE_ID, "a" * 32)


async def test_tracestate_comes_back_unchanged_when_kept(service):
    async with service.client() as c:
        state = "congo=t61rcWkgMzE, rojo=00f067aa0ba902b7"
        r = await c.post(
            "/v1/polarity",
            json={"text": "good"},
            headers={"traceparent": SAMPLED, "tracestate": state},
        )
        assert r.headers["tracestate"] == state
        # several lines are one list
        r = await c.post(
            "/v1/polarity",
            json={"text": "good"},
            headers=[("traceparent", SAMPLED), ("tracestate", "a=1"), ("tracestate", "b=2")],
        )
        assert r.headers["tracestate"] == "a=1,b=2"
        # over the bound: dropped whole (a cut list could split a member), the trace kept
        long = "a=" + "x" * TRACESTATE_MAX
        r = await c.post(
            "/v1/polarity",
            json={"text": "good"},
            headers={"traceparent": SAMPLED, "tracestate": long},
        )
        assert r.status_code == 200 and "tracestate" not in r.headers
        assert answered_trace(r)[0] == TRACE_ID
        assert "tracestate" not in (await c.post("/v1/polarity", json={"text": "good"})).headers


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/v1/polarity", {"text": "good"}, 200),  # the fast path
        ("POST", "/v1/polarity?model=polarity-en&x=1", {"text": "good"}, 422),  # FastAPI's
        ("POST", "/v1/polarity", {"text": ""}, 422),
        ("POST", "/v1/polarity", {"nope": 1}, 422),
        ("GET", "/v1/nothing", None, 404),
        ("GET", "/v1/models", None, 200),
        ("GET", "/v2/models/polarity-en", None, 200),
        ("POST", "/v2/models/polarity-en/infer", {"inputs": []}, 400),
        ("POST", "/v2/models/nothing/infer", {"inputs": []}, 404),
        (
            "POST",
            "/v2/models/polarity-en/infer",
            {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["good"]}]},
            200,
        ),
    ],
)
async def test_every_answer_carries_the_trace(client, method, path, body, status):
    r = await client.request(method, path, json=body, headers={"traceparent": SAMPLED})
    assert r.status_code == status, r.text
    trace_id, span_id, flags = answered_trace(r)
    assert (trace_id, flags) == (TRACE_ID, "01") and span_id != PARENT_ID


# ------------------------------------------------------------------ logs
@contextmanager
def json_log_lines() -> Iterator[list[dict]]:
    """What ``NLPSERVE_LOG_FORMAT=json`` writes, as the lines are logged (the format reads
    the request being served at that moment), parsed once the block ends."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    lines: list[dict] = []
    try:
        yield lines
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        lines.extend(json.loads(line) for line in out.getvalue().splitlines())


@pytest.mark.parametrize("backend", ["inprocess", "redis"])
async def test_log_lines_about_a_request_carry_its_trace(model_repo, tmp_path_factory, backend):
    """An inference failure is logged by the API (the request's line) and where the item ran
    (the batch's thread; in Redis mode the worker, which reads the ids from the entry): every
    one of those lines names the caller's trace id and the request's span."""
    from tests.conftest import QUEUE_BACKENDS

    repo = diverged_detector_repo(model_repo, tmp_path_factory.mktemp("diverged-trace"))
    settings = make_settings(repo, variant="fp32", redis_max_attempts=1)
    async with QUEUE_BACKENDS[backend](settings) as s, live_server(s) as srv, srv.client() as c:
        with json_log_lines() as lines:
            bad = await c.post(
                "/v1/detect",
                json={"text": "a zebra"},
                headers={"traceparent": SAMPLED, "X-Request-ID": "trace-req-1"},
            )
            assert bad.status_code == 422, bad.text
            ok = await c.post("/v1/detect", json={"text": "a great film"})  # another trace
            assert ok.status_code == 200, ok.text
    _, span_id, _ = answered_trace(bad)
    api = [d for d in lines if d.get("request_id") == "trace-req-1"]
    assert len(api) == 1 and "inference failed" in api[0]["message"], lines
    item_id = api[0]["item_id"]
    about_item = [d for d in lines if d.get("item_id") == item_id]
    # the API's line, the batch's non-finite output and, in Redis mode, the dead letter
    assert len(about_item) >= (3 if backend == "redis" else 2), about_item
    for doc in about_item:
        assert (doc.get("trace_id"), doc.get("span_id")) == (TRACE_ID, span_id), doc
    if backend == "redis":
        assert any("dead-letter" in d["message"] and d.get("worker") for d in about_item)
    # nothing logged outside a request is stamped with one
    assert not [d for d in lines if d.get("trace_id") and d.get("item_id") != item_id]


# ------------------------------------------------------------------ exemplars
_EXEMPLAR = re.compile(
    r"^nlpserve_request_duration_seconds_bucket\{[^}]*\} \S+ "
    r'# \{trace_id="(?P<id>[0-9a-f]{32})"\} \S+'
)
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def exemplar_ids(text: str) -> set[str]:
    return {m["id"] for line in text.splitlines() if (m := _EXEMPLAR.match(line))}


async def test_a_sampled_request_is_an_exemplar_of_its_latency(client):
    sampled_id, unsampled_id = "ab" * 16, "cd" * 16
    for trace_id, flags in ((sampled_id, "01"), (unsampled_id, "00")):
        r = await client.post(
            "/v1/polarity",
            json={"text": "good"},
            headers={"traceparent": f"00-{trace_id}-{PARENT_ID}-{flags}"},
        )
        assert r.status_code == 200
    m = await client.get("/metrics", headers={"Accept": OPENMETRICS})
    assert m.status_code == 200
    assert m.headers["content-type"].startswith("application/openmetrics-text")
    assert m.text.rstrip().endswith("# EOF")
    ids = exemplar_ids(m.text)
    assert sampled_id in ids and unsampled_id not in ids, ids
    # the classic text format stays the default, and has no exemplars
    plain = await client.get("/metrics")
    assert plain.headers["content-type"].startswith("text/plain")
    assert "# {" not in plain.text and "nlpserve_request_duration_seconds_bucket" in plain.text
    # q=0 says "not this one": the text format, as for any scrape that does not ask
    refused = await client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text;q=0, text/plain"}
    )
    assert refused.headers["content-type"].startswith("text/plain")
    weighted = await client.get(
        "/metrics",
        headers={"Accept": "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;q=0.3"},
    )
    assert weighted.headers["content-type"].startswith("application/openmetrics-text")

"""Every error leaves as {"error": {"code", "message"}} with the right 4xx/5xx, never a 500
for bad input and never a hang."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket

import httpx
import pytest
import pytest_asyncio

from service.api.routes.explain import warm_up_explain
from tests.service_support import (
    diverged_detector_repo,
    live_server,
    make_settings,
    metric_value,
    read_metrics,
    require_model,
    wait_for,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

LIMITS = dict(max_body_bytes=4000, max_text_chars=300, max_batch_items=3, max_queue_depth=3)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def limited(model_repo):
    """A server with small limits; tests pause its queue to hold requests deterministically."""
    async with live_server(make_settings(model_repo, **LIMITS)) as srv:
        yield srv


@pytest_asyncio.fixture(loop_scope="session")
async def lc(limited):
    limited.queue.resume()
    async with limited.client() as c:
        yield c
    limited.queue.resume()


def assert_error(
    r: httpx.Response, status: int, code: str, limit: tuple[str, float] | None = None
) -> dict:
    """The error body, with ``limit`` (name, value) where a limit refused the request and
    without the field everywhere else."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    fields = {"code", "message"} | ({"limit"} if limit is not None else set())
    assert set(body) == {"error"} and set(body["error"]) == fields, body
    assert body["error"]["code"] == code, body
    if limit is not None:
        assert body["error"]["limit"] == {"name": limit[0], "value": limit[1]}, body
    assert body["error"]["message"]
    return body["error"]


# ------------------------------------------------------------------ request format
@pytest.mark.parametrize(
    "content, status, code",
    [
        (b'{"text": "a dog"', 400, "invalid_json"),
        (b"not json at all", 400, "invalid_json"),
        (b"", 422, "missing_body"),
        (b"[]", 422, "wrong_type"),
        (b'"a dog"', 422, "wrong_type"),
        (b"null", 422, "wrong_type"),
        (b'{"text": "\\ud800 lone surrogate"}', 422, "invalid_text"),
        (b'{"txt": "a dog"}', 422, "missing_field"),
        (b'{"text": 12}', 422, "wrong_type"),
        (b'{"text": null}', 422, "wrong_type"),
        (b'{"text": "a dog", "extra": 1}', 422, "unknown_field"),
        (b'{"text": ""}', 422, "empty_text"),
        (b'{"text": "\\t\\n "}', 422, "empty_text"),
        (b'{"text": "\\u200b"}', 422, "empty_text"),  # zero-width space: no tokens at all
        (b'{"text": "\\u0000 \\u00ad\\u202e\\u3000"}', 422, "empty_text"),
        (b'{"text": "\xff\xfe abc"}', 400, "invalid_json"),
        (b'{"text": ' + b"1" * 5000 + b"}", 400, "invalid_json"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json"),
        (b'{"inputs": []}', 422, "empty_inputs"),
        (b'{"inputs": null}', 422, "wrong_type"),
        (b'{"inputs": [{"text": "ok"}, {"text": 5}]}', 422, "wrong_type"),
        (b'{"inputs": {"text": "a"}}', 422, "wrong_type"),
    ],
)
async def test_bad_bodies(client, content, status, code):
    r = await client.post(
        "/v1/polarity", content=content, headers={"content-type": "application/json"}
    )
    err = assert_error(r, status, code)
    if code == "wrong_type" and b"inputs" in content and b"[{" in content:
        assert err["message"].startswith("inputs[1].text")


@pytest.mark.parametrize(
    "path, content, prefix",
    [
        ("/v1/polarity", b'{"text": "a dog", "\\ud800x": 1}', ""),
        (
            "/v1/polarity",
            b'{"inputs": [{"text": "a"}, {"text": "b", "\\udfff": 1}]}',
            "inputs[1]: ",
        ),
        ("/v1/polarity/explain", b'{"text": "a dog", "\\udc00": 1}', ""),
    ],
)
async def test_a_field_name_that_is_not_valid_unicode_is_invalid_text(lc, path, content, prefix):
    """A lone surrogate in a JSON key: pydantic cannot read the key, and answered 422
    invalid_request "Input should be a valid string, unable to parse raw data as a unicode
    string" for an object, naming nothing."""
    r = await lc.post(path, content=content, headers={"content-type": "application/json"})
    err = assert_error(r, 422, "invalid_text")
    assert err["message"] == f"{prefix}a field name holds an unpaired surrogate: not valid Unicode"


@pytest.mark.parametrize(
    "content, reason",
    [
        (b'{"text": "\xff\xfe abc"}', "not UTF-8 (byte 0xff at position 10)"),
        (b'{"text": ' + b"1" * 5000 + b"}", "too many digits"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
)
async def test_undecodable_body_says_why(client, content, reason):
    r = await client.post(
        "/v1/polarity", content=content, headers={"content-type": "application/json"}
    )
    assert reason in assert_error(r, 400, "invalid_json")["message"]


@pytest.mark.parametrize("path", ["/v1/polarity", "/v1/polarity/explain"])
async def test_compressed_body_is_415(client, path):
    body = gzip.compress(b'{"text": "a fine film"}')
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    r = await client.post(path, content=body, headers=headers)
    assert "gzip" in assert_error(r, 415, "unsupported_media_type")["message"]
    # the header decides, not whether the body happens to parse as it is
    headers["content-encoding"] = "br"
    r = await client.post(path, content=b'{"text": "a fine film"}', headers=headers)
    assert "'br'" in assert_error(r, 415, "unsupported_media_type")["message"]
    # two header lines: each counts, not only the last
    two = [("content-type", "application/json"), ("content-encoding", "gzip"),
           ("content-encoding", "identity")]  # fmt: skip
    r = await client.post(path, content=b'{"text": "a fine film"}', headers=two)
    assert_error(r, 415, "unsupported_media_type")
    # identity passes the check: the body is read and validated. An explanation is asked
    # with too small a budget (422 from the schema): a real one would pay shap's start-up,
    # which took over the tests' 20 s deadline on a busy machine.
    body, status = (
        (b'{"text": "a fine film", "max_evals": 1}', 422)
        if path.endswith("/explain")
        else (b'{"text": "a fine film"}', 200)
    )
    for identity in ("identity", "Identity, identity"):
        headers["content-encoding"] = identity
        r = await client.post(path, content=body, headers=headers)
        assert r.status_code == status, r.text
        if status == 422:
            assert "max_evals" in assert_error(r, 422, "invalid_request")["message"]


@pytest.mark.parametrize("path", ["/v1/polarity", "/v1/polarity/explain"])
@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
async def test_json_in_another_unicode_encoding_is_400(client, path, encoding):
    """json.loads takes UTF-16/32 bytes; the API takes UTF-8 JSON only, as documented."""
    content = '{"text": "a fine film"}'.encode(encoding)
    r = await client.post(path, content=content, headers={"content-type": "application/json"})
    assert "NUL byte" in assert_error(r, 400, "invalid_json")["message"]


async def test_invalid_json_says_where(client):
    r = await client.post(
        "/v1/polarity/explain", content=b'{"text": "a\x01b"}', headers={"content-type": "j"}
    )
    message = assert_error(r, 400, "invalid_json")["message"]
    assert message.endswith("Invalid control character at character 11"), message


@pytest.mark.parametrize("task", ["pos", "polarity", "detect", "qa"])
async def test_a_huge_list_stops_validation_at_its_bound(task):
    """330,000 wrong items were each validated and listed (1.3 s of the event loop, a
    request that anyone could repeat): the schema's bound stops validation at once."""
    from pydantic import TypeAdapter, ValidationError

    from service.api.routes.predict import BODIES
    from service.config import MAX_LIST_ITEMS

    bodies = [{"inputs": [1] * 330_000}]
    if task == "pos":
        bodies.append({"tokens": [1] * 330_000})
    for body in bodies:
        with pytest.raises(ValidationError) as e:
            TypeAdapter(BODIES[task]).validate_python(body)
        assert e.value.error_count() == 1, e.value.errors()[:3]
        assert f"at most {MAX_LIST_ITEMS}" in e.value.errors()[0]["msg"]


async def test_huge_lists_are_refused_with_their_codes(service, client):
    r = await client.post("/v1/pos", json={"tokens": ["a"] * 10_001})
    assert "at most 10000" in assert_error(r, 422, "input_too_long")["message"]
    # a query parameter sends the request down FastAPI's own path: the same answer
    limit = ("max_batch_items", service.settings.max_batch_items)
    for path in ("/v1/polarity", "/v1/polarity?x=1"):
        r = await client.post(path, json={"inputs": [{"text": 1}] * 20_000})
        assert_error(r, 422, "too_many_items", limit)


async def test_missing_field_message_names_the_field(client):
    err = assert_error(await client.post("/v1/qa", json={"question": "x"}), 422, "missing_field")
    assert "context" in err["message"]


@pytest.mark.parametrize(
    "content",
    [
        b"\xff\xfe\x00garbage",
        b'{"text": "\\udfff", "question": "\\ud83d", "context": "\\ud83d\\ude00"}',
        b'{"text": "a", "text": "b"}',
        b"[" * 5000 + b"]" * 5000,
        b'{"text": 1e999}',
        b'{"inputs": [[], {}, null]}',
        b'{"tokens": [null]}',
        b'{"text": "x", "tokens": null}',
        b'{"question": {"a": 1}, "context": []}',
    ],
)
@pytest.mark.parametrize("path", ["/v1/pos", "/v1/polarity", "/v1/detect", "/v1/qa"])
async def test_garbage_is_never_a_500(client, path, content):
    r = await client.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code < 500, (r.status_code, r.text)
    if r.status_code >= 400:
        assert "error" in r.json()


@pytest.mark.parametrize(
    "ctype", [None, "application/x-www-form-urlencoded", "text/plain; charset=utf-8"]
)
async def test_json_body_is_read_whatever_the_content_type(client, ctype):
    # `curl -d '{...}'` declares a form body: the API reads JSON all the same.
    headers = {"content-type": ctype} if ctype else {}
    body = b'{"text": "a great, moving film"}'
    r = await client.post("/v1/polarity", content=body, headers=headers)
    ref = await client.post("/v1/polarity", json={"text": "a great, moving film"})
    assert r.status_code == 200, r.text
    assert r.json() == ref.json()
    assert_error(
        await client.post(
            "/v1/polarity",
            content=b"text=great",
            headers={"content-type": "application/x-www-form-urlencoded"},
        ),
        400,
        "invalid_json",
    )


# ------------------------------------------------------------------ routing and models
async def test_unknown_endpoint_and_method(client):
    assert_error(await client.post("/v1/translate", json={"text": "x"}), 404, "not_found")
    assert_error(await client.get("/nope"), 404, "not_found")
    assert_error(await client.get("/v1/polarity"), 405, "method_not_allowed")
    # a trailing slash is another path: 404, not a redirect built from the Host header
    for path in ("/v1/polarity/", "/healthz/"):
        r = await client.post(path, json={"text": "x"}) if "v1" in path else await client.get(path)
        assert_error(r, 404, "not_found")
        assert "location" not in r.headers


async def test_unknown_model_and_wrong_task(client):
    err = assert_error(
        await client.post("/v1/polarity?model=nope", json={"text": "x"}), 404, "model_not_found"
    )
    assert "polarity-en" in err["message"]  # says what IS loaded
    err = assert_error(
        await client.post("/v1/polarity?model=pos-en", json={"text": "x"}), 404, "model_not_found"
    )
    assert "'pos'" in err["message"]
    ok = await client.post("/v1/polarity?model=polarity-en", json={"text": "great"})
    assert ok.status_code == 200


async def test_query_parameters_other_than_one_model_are_refused(client):
    """A pinned ``?version=`` must not be answered by another version in silence."""
    for query, says in [
        ("model=polarity-en&version=2", "'version'"),
        ("foo=bar", "'foo'"),
        ("model=polarity-en&model=nope", "given twice"),
        ("model=nope&model=polarity-en", "given twice"),
    ]:
        r = await client.post(f"/v1/polarity?{query}", json={"text": "great"})
        assert says in assert_error(r, 422, "unknown_parameter")["message"]
    long = "x" * 60_000
    err = assert_error(
        await client.post(f"/v1/polarity?model={long}", json={"text": "x"}), 404, "model_not_found"
    )
    assert len(err["message"]) < 400 and "60000 characters" in err["message"]


async def test_endpoint_without_its_model_is_a_clear_404(tmp_path, model_repo):
    (tmp_path / "pos-en").symlink_to(model_repo / "pos-en")
    async with live_server(make_settings(tmp_path)) as srv, srv.client() as c:
        for path, body in [
            ("/v1/polarity", {"text": "x"}),
            ("/v1/detect", {"text": "x"}),
            ("/v1/qa", {"question": "q", "context": "c"}),
        ]:
            err = assert_error(await c.post(path, json=body), 404, "model_not_loaded")
            assert "pos-en" in err["message"] and "model repository has none" in err["message"]
            assert str(tmp_path) not in err["message"]  # a client learns no server paths
        assert (await c.post("/v1/pos", json={"text": "a dog"})).status_code == 200
        models = (await c.get("/v1/models")).json()["models"]
        assert [m["name"] for m in models] == ["pos-en"]


# ------------------------------------------------------------------ limits
async def test_text_over_the_character_limit(lc):
    err = assert_error(
        await lc.post("/v1/polarity", json={"text": "great " * 60}), 422, "text_too_long"
    )
    assert "300" in err["message"]
    # Every text field counts, and the batch item at fault is named.
    batch = {"inputs": [{"text": "ok"}, {"text": "x" * 301}]}
    err = assert_error(await lc.post("/v1/detect", json=batch), 422, "text_too_long")
    assert err["message"].startswith("inputs[1]:")
    err = assert_error(
        await lc.post("/v1/pos", json={"tokens": ["word"] * 80}), 422, "text_too_long"
    )
    assert err["message"].startswith("tokens have 399 characters")  # joined, as read
    body = {"question": "q", "context": "长" * 301}
    err = assert_error(await lc.post("/v1/qa", json=body), 422, "text_too_long")
    assert err["message"].startswith("context has 301 characters")


async def test_request_that_can_never_fit_the_queue_is_422_not_429(lc, model_repo):
    require_model(model_repo, "qa-zh")
    context = "中国的首都是北京，它有三千多年的历史。" * 14  # > 3 windows, < 300 chars
    r = await lc.post("/v1/qa", json={"question": "首都？", "context": context})
    # the limit in force, named for what it counts (model sequences), is the queue's depth
    limit = ("max_request_sequences", LIMITS["max_queue_depth"])
    err = assert_error(r, 422, "input_too_long", limit)
    assert "NLPSERVE_MAX_QUEUE_DEPTH" in err["message"]


async def test_one_request_may_need_only_so_many_sequences(model_repo):
    """Requests run oldest first: one QA request of 1,016 windows held the model for ~13 s
    while every later one waited. NLPSERVE_MAX_REQUEST_SEQUENCES bounds a request."""
    require_model(model_repo, "qa-zh")
    settings = make_settings(model_repo, max_request_sequences=3, max_batch_items=3)
    context = "中国的首都是北京，它有三千多年的历史。" * 14  # > 3 windows
    async with live_server(settings) as srv, srv.client() as c:
        r = await c.post("/v1/qa", json={"question": "首都？", "context": context})
        err = assert_error(r, 422, "input_too_long", ("max_request_sequences", 3))
        assert "(QA windows of its contexts); one request may need at most 3" in err["message"]
        assert "NLPSERVE_MAX_REQUEST_SEQUENCES" in err["message"]
        short = {"question": "首都？", "context": "中国的首都是北京。"}
        assert (await c.post("/v1/qa", json={"inputs": [short] * 3})).status_code == 200
        # explanations submit their masked texts within the limit too. shap's start-up first,
        # untimed: it is the process's first (this file alone), it can outlast the request's
        # 20 s deadline on a busy machine (seen: 504 "waiting for shap's start-up")
        await warm_up_explain(srv.app)
        r = await c.post(
            "/v1/polarity/explain", json={"text": "a fine, warm film", "max_evals": 40}
        )
        assert r.status_code == 200, r.text


async def test_too_many_items(lc):
    limit = ("max_batch_items", LIMITS["max_batch_items"])
    err = assert_error(
        await lc.post("/v1/polarity", json={"inputs": [{"text": "good"}] * 4}),
        422,
        "too_many_items",
        limit,
    )
    assert err["message"] == "4 inputs in one request; the limit is 3 (NLPSERVE_MAX_BATCH_ITEMS)"
    # valid items: FastAPI's validation path (a query parameter) says the same
    r = await lc.post("/v1/polarity?model=polarity-en", json={"inputs": [{"text": "ok"}] * 4})
    assert assert_error(r, 422, "too_many_items", limit) == err
    ok = await lc.post("/v1/polarity", json={"inputs": [{"text": "good"}] * 3})
    assert ok.status_code == 200


async def test_a_long_path_is_not_echoed_whole_in_404_and_405_messages(lc):
    """Like a long ?model= name (clip_name), a 10,000-character path is cut in the message."""
    for method, path, status, code in [
        ("GET", "/v1/" + "x" * 10_000, 404, "not_found"),
        ("POST", "/v1/models/" + "x" * 10_000, 405, "method_not_allowed"),
    ]:
        err = assert_error(await lc.request(method, path), status, code)
        assert len(err["message"]) < 400, err["message"][:100]
        assert f"... ({len(path)} characters)" in err["message"]
    short = assert_error(await lc.get("/v1/nope"), 404, "not_found")
    assert short["message"] == "no endpoint GET /v1/nope (see /docs)"


@pytest.mark.parametrize("path", ["/v1/polarity/explain", "/v1/detect/explain"])
async def test_an_inputs_list_on_an_explain_endpoint_is_an_unknown_field(lc, path):
    """Explanations take one text and no ``inputs``: a long ``inputs`` list there is an
    unknown field, not ``too_many_items`` (which said the endpoint took batches of 3)."""
    for n in (1, 4):
        err = assert_error(
            await lc.post(path, json={"inputs": [{"text": "good"}] * n}), 422, "missing_field"
        )
        assert "text: Field required" in err["message"]
        assert "inputs: unknown field" in err["message"]


BODY_LIMIT = ("max_body_bytes", LIMITS["max_body_bytes"])


async def test_body_over_the_size_limit_by_content_length(lc):
    r = await lc.post("/v1/polarity", json={"text": "x" * 5000})
    assert_error(r, 413, "body_too_large", BODY_LIMIT)


async def test_body_over_the_size_limit_chunked(lc):
    async def chunks():
        yield b'{"text": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    for path in ("/v1/polarity", "/v1/polarity/explain"):  # the fast path's, FastAPI's
        r = await lc.post(path, content=chunks(), headers={"content-type": "application/json"})
        assert_error(r, 413, "body_too_large", BODY_LIMIT)


async def test_body_of_exactly_the_size_limit_is_accepted(lc):
    """The limit is inclusive, by Content-Length and by bytes streamed (chunked)."""
    body = b'{"text": "good film"}'
    body += b" " * (LIMITS["max_body_bytes"] - len(body))
    assert len(body) == LIMITS["max_body_bytes"]
    headers = {"content-type": "application/json"}
    r = await lc.post("/v1/polarity", content=body, headers=headers)
    assert r.status_code == 200, r.text

    async def chunks():
        yield body[:100]
        yield body[100:]

    r = await lc.post("/v1/polarity", content=chunks(), headers=headers)
    assert r.status_code == 200, r.text


async def test_declared_oversize_body_is_refused_before_it_is_sent(limited):
    """A Content-Length over the limit is answered 413 from the headers alone: the client
    sends no body at all (it closes its side after the headers)."""
    head = (
        "POST /v1/polarity HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {LIMITS['max_body_bytes'] + 1}\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", limited.port)
    try:
        writer.write(head)
        await writer.drain()
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    error = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == "body_too_large"
    assert error["limit"] == {"name": "max_body_bytes", "value": LIMITS["max_body_bytes"]}


# ------------------------------------------------------------------ queue and deadlines
async def test_queue_full_is_429_with_retry_after(limited, lc):
    q = limited.queue
    q.pause()
    held = [
        asyncio.create_task(lc.post("/v1/polarity", json={"text": t}))
        for t in ("good film", "bad film", "fine film")
    ]
    await wait_for(lambda: q.depth("polarity-en") == 3)
    r = await lc.post("/v1/polarity", json={"text": "one too many"})
    assert_error(r, 429, "queue_full")
    assert int(r.headers["retry-after"]) >= 1
    # Each model has its own limit: the tagger still takes work.
    other = asyncio.create_task(lc.post("/v1/pos", json={"text": "a dog"}))
    await wait_for(lambda: q.depth("pos-en") == 1)
    q.resume()
    assert [(await t).status_code for t in [*held, other]] == [200, 200, 200, 200]
    text = await read_metrics(lc)
    assert metric_value(text, "nlpserve_rejected_total", model="polarity-en", reason="queue_full")


async def test_a_deadline_refusal_is_queue_full_counted_apart(limited, lc):
    """Both refusals are a 429 queue_full to the client; the rejections metric tells the
    depth limit (`queue_full`) from work ahead that outlasts the deadline, so an operator
    sees which one sheds the load."""
    q = limited.queue

    async def rejected() -> dict[str, float]:
        text = await read_metrics(lc)
        return {
            why: metric_value(text, "nlpserve_rejected_total", model="polarity-en", reason=why)
            for why in ("queue_full", "queue_full_deadline")
        }

    assert (await lc.post("/v1/polarity", json={"text": "a film"})).status_code == 200
    before = await rejected()
    pace = q._seq_cost["polarity-en"]
    q.pause()
    try:
        q._seq_cost["polarity-en"] = 100.0  # the model's recent pace: 100 s per sequence
        held = asyncio.create_task(lc.post("/v1/polarity", json={"text": "good film"}))
        await wait_for(lambda: q.depth("polarity-en") == 1)
        r = await lc.post("/v1/polarity", json={"text": "hurry"}, headers={"X-Deadline-Ms": "5000"})
    finally:
        q._seq_cost["polarity-en"] = pace  # the server is shared with the next tests
        q.resume()
    assert_error(r, 429, "queue_full")
    assert "deadline is" in r.json()["error"]["message"]
    assert (await held).status_code == 200
    after = await rejected()
    assert after["queue_full"] == before["queue_full"]
    assert after["queue_full_deadline"] == before["queue_full_deadline"] + 1


async def test_whole_batch_is_refused_when_it_does_not_fit(limited, lc):
    q = limited.queue
    q.pause()
    held = [asyncio.create_task(lc.post("/v1/polarity", json={"text": t})) for t in "ab"]
    await wait_for(lambda: q.depth("polarity-en") == 2)
    r = await lc.post("/v1/polarity", json={"inputs": [{"text": "a"}] * 2})
    assert_error(r, 429, "queue_full")
    assert q.depth("polarity-en") == 2  # nothing of the batch was half-admitted
    q.resume()
    assert [(await t).status_code for t in held] == [200, 200]


async def test_deadline_exceeded_is_504_and_the_item_never_runs(limited, lc):
    q = limited.queue
    q.pause()
    ran_before = len(q.batch_log)
    r = await lc.post("/v1/polarity", json={"text": "great"}, headers={"X-Deadline-Ms": "50"})
    message = assert_error(r, 504, "deadline_exceeded")["message"]
    assert "not served before the request deadline" in message and "ms were left" in message
    assert q.waiting == 0
    q.resume()
    await wait_for(lambda: q.depth("polarity-en") == 0)
    r = await lc.post("/v1/polarity", json={"text": "great"})  # the loop is alive
    assert r.status_code == 200
    assert len(q.batch_log) == ran_before + 1  # only the second request ran


@pytest.mark.parametrize(
    "value", ["soon", "-5", "0", "0.0", "nan", "", "inf", "1e3", "1_000", "0x10", "1.5.2", "9" * 33]
)
async def test_bad_deadline_header(lc, value):
    r = await lc.post("/v1/polarity", json={"text": "x"}, headers={"X-Deadline-Ms": value})
    assert_error(r, 400, "invalid_header")


@pytest.mark.parametrize("path", ["/v1/polarity", "/v1/polarity?model=polarity-en"])
async def test_a_deadline_header_given_twice_is_refused(lc, path):
    """Two X-Deadline-Ms fields read as one list (RFC 9110), "5000, 0", which is no number of
    milliseconds: refused as ``model`` given twice is. The first one was used, the second
    ignored."""
    headers = [("X-Deadline-Ms", "5000"), ("X-Deadline-Ms", "0")]
    r = await lc.post(path, json={"text": "x"}, headers=headers)
    assert "got '5000, 0'" in assert_error(r, 400, "invalid_header")["message"]


@pytest.mark.parametrize(
    "value", ["20000", "20000.5", "09000", "20000.", "1234567.8901234567", "9" * 20]
)
async def test_deadline_header_in_milliseconds(lc, value):
    r = await lc.post("/v1/polarity", json={"text": "x"}, headers={"X-Deadline-Ms": value})
    assert r.status_code == 200, r.text


async def test_client_that_goes_away_is_not_run(limited, lc):
    q = limited.queue
    q.pause()
    ran_before = len(q.batch_log)
    body = json.dumps({"text": "a charming film"}).encode()
    request = (
        f"POST /v1/polarity HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    reader, writer = await asyncio.open_connection("127.0.0.1", limited.port)
    writer.write(request)
    await writer.drain()
    await wait_for(lambda: q.depth("polarity-en") == 1)
    writer.transport.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
    )
    writer.close()
    await wait_for(lambda: q.waiting == 0)  # the handler saw the disconnect and withdrew
    q.resume()
    await wait_for(lambda: q.depth("polarity-en") == 0)
    assert len(q.batch_log) == ran_before
    text = await read_metrics(lc)
    assert metric_value(
        text, "nlpserve_rejected_total", model="polarity-en", reason="client_closed_request"
    )


@pytest.mark.parametrize("path", ["/v1/polarity", "/v1/polarity/explain"])
async def test_client_gone_mid_body_counts_as_closed_not_bad_request(limited, lc, path):
    """A client that dropped the connection halfway through its body was counted as a 400
    bad_request: 4xx alerts fired for clients that left (a deploy's dropped uploads). It is
    counted like a client that leaves while queued: 499 client_closed_request."""
    before = await read_metrics(lc)
    reader, writer = await asyncio.open_connection("127.0.0.1", limited.port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Content-Length: 100\r\n\r\n".encode()
        + b'{"text": "a cha'
    )
    await writer.drain()
    writer.close()

    def count(text: str, status: str) -> float:
        return metric_value(
            text, "nlpserve_requests_total", model="polarity-en", endpoint=endpoint, status=status
        )

    endpoint = "explain" if path.endswith("explain") else "predict"
    for _ in range(200):
        after = await read_metrics(lc)
        if count(after, "499") > count(before, "499") or count(after, "400") > count(before, "400"):
            break
        await asyncio.sleep(0.02)
    assert count(after, "499") == count(before, "499") + 1
    assert count(after, "400") == count(before, "400")


# ------------------------------------------------------------------ inference failures
@pytest.mark.parametrize("backend", ["inprocess", "redis"])
async def test_inference_failure_is_logged_with_the_request_id(
    model_repo, tmp_path_factory, caplog, backend
):
    """A 422 inference_failed (here a diverged model: the unknown-word embedding row is NaN)
    was logged nowhere with the X-Request-ID a client quotes: the API logs it now, with the
    work item id that the worker's log and the dead letter carry."""
    from tests.conftest import QUEUE_BACKENDS

    repo = diverged_detector_repo(model_repo, tmp_path_factory.mktemp("diverged"))
    settings = make_settings(repo, variant="fp32", redis_max_attempts=1)
    async with QUEUE_BACKENDS[backend](settings) as s, live_server(s) as srv, srv.client() as c:
        ok = await c.post("/v1/detect", json={"text": "a truly great film"})
        assert ok.status_code == 200, ok.text
        with caplog.at_level("WARNING"):
            bad = await c.post(
                "/v1/detect", json={"text": "a zebra"}, headers={"X-Request-ID": "client-req-42"}
            )
        assert_error(bad, 422, "inference_failed")
    records = [r for r in caplog.records if "client-req-42" in r.getMessage()]
    logged = [r.getMessage() for r in records]
    assert len(logged) == 1 and "inference failed on work item" in logged[0], logged
    item_id = logged[0].split("work item ")[1].split(":")[0]
    assert len(item_id) == 32
    # the same ids as fields of their own, for NLPSERVE_LOG_FORMAT=json
    assert (records[0].request_id, records[0].item_id) == ("client-req-42", item_id)
    if backend == "redis":  # the worker's line names the same work item
        worker = [r for r in caplog.records if "goes to the dead-letter stream" in r.getMessage()]
        assert len(worker) == 1 and item_id in worker[0].getMessage(), worker
        assert (worker[0].item_id, worker[0].model) == (item_id, "detector-en")

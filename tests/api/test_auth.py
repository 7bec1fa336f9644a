"""API keys (``NLPSERVE_API_KEYS_FILE``, service/api/auth.py) over real HTTP: off by default;
on, every route family refuses a request without a key of the file (401, in /v2's own error
shape there) and serves one with it, as Bearer or X-API-Key; probes, metrics, docs and the
demo page's files need none; CORS preflights still work; the file is re-read when it changes
(a broken rewrite keeps the keys in force) and on SIGHUP; a broken file stops `nlpserve
serve` with one line; `nlpserve keys new` prints a key and a line that work together;
`nlpserve keys check` refuses what serve refuses in the same line and prints the limits a
server puts in force; no key ever reaches the logs."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from service.api.auth import (
    HASH_PREFIX,
    KeyFileError,
    Rate,
    digest,
    key_line,
    parse_keys,
)
from service.logs import JsonFormatter
from tests.redis_support import redis_backend
from tests.service_support import (
    POLARITY_MODEL,
    POS_MODEL,
    LiveServer,
    live_server,
    make_settings,
    metric_value,
    read_metrics,
)

session_loop = pytest.mark.asyncio(loop_scope="session")

ROOT = Path(__file__).resolve().parents[2]
ALICE_KEY = "alice-key-0123456789-abcdefghij"  # in the file as its sha256
BOB_KEY = "bob-plaintext-key-9876543210"  # in the file as itself
WRONG_KEY = "wrong-key-0000000000-zzzzzzzz"
ORIGIN = "http://localhost:9"
LOADED = f"{POLARITY_MODEL},{POS_MODEL}"  # the LSTMs: a server starts in a second


def keys_text(**clients: str) -> str:
    return "".join(f"{name} {line}\n" for name, line in clients.items())


KEYS_FILE = (
    "# nlpserve clients\n\n"
    f"alice {HASH_PREFIX}{digest(ALICE_KEY).hex()}\n"
    f"bob {BOB_KEY}   # plaintext: allowed, not recommended\n"
)


def v2_body(text: str = "a wonderful film") -> dict[str, Any]:
    return {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}


# (method, path, JSON body): one of each protected route family
PROTECTED = [
    ("POST", "/v1/polarity", {"text": "a wonderful film"}),  # the fast path
    ("POST", "/v1/pos", {"inputs": [{"text": "the dog runs"}]}),
    ("GET", "/v1/models", None),
    ("GET", f"/v1/models/{POLARITY_MODEL}", None),
    ("POST", f"/v2/models/{POLARITY_MODEL}/infer", v2_body()),
    ("GET", f"/v2/models/{POLARITY_MODEL}", None),
    ("GET", "/v2", None),
]
EXEMPT = [
    ("GET", "/healthz"),
    ("HEAD", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/v2/health/live"),
    ("GET", "/v2/health/ready"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/redoc"),
    ("GET", "/docs-assets/swagger-ui.css"),
    ("GET", "/"),
    ("GET", "/static/demo.js"),
]


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "api-keys"
    path.write_text(KEYS_FILE)
    return path


class Captured(logging.Handler):
    """Every record of the service's loggers, formatted as the JSON log would be."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def captured() -> Iterator[Captured]:
    handler = Captured()
    logger = logging.getLogger("service")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def auth_service(model_repo, keys_file, captured) -> AsyncIterator[LiveServer]:
    settings = make_settings(
        model_repo, load_models=LOADED, api_keys_file=keys_file, cors_allow_origins=ORIGIN
    )
    async with live_server(settings) as srv:
        yield srv


async def call(srv: LiveServer, method: str, path: str, body: Any, **headers: str):
    async with srv.client() as c:
        return await c.request(method, path, json=body, headers=headers)


# --------------------------------------------------------------------------- off
@session_loop
async def test_no_keys_file_no_authentication(inprocess_service):
    async with inprocess_service.client() as c:
        for method, path, body in PROTECTED:
            r = await c.request(method, path, json=body)
            assert r.status_code == 200, (path, r.text)
        assert "securitySchemes" not in (await c.get("/openapi.json")).json()["components"]
        assert "nlpserve_auth_failures_total" not in await read_metrics(c)


# --------------------------------------------------------------------------- on
@session_loop
@pytest.mark.parametrize(("method", "path", "body"), PROTECTED)
async def test_protected_routes_need_a_key_of_the_file(auth_service, method, path, body):
    r = await call(auth_service, method, path, body)
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == 'Bearer realm="nlpserve"'
    assert r.headers["x-request-id"]
    wrong = await call(auth_service, method, path, body, Authorization=f"Bearer {WRONG_KEY}")
    assert wrong.status_code == 401
    assert WRONG_KEY not in wrong.text  # never echoed
    if path.startswith("/v2"):  # the V2 protocol's error shape
        assert isinstance(r.json()["error"], str) and "API key" in r.json()["error"]
        assert isinstance(wrong.json()["error"], str)
    else:
        assert r.json()["error"]["code"] == "unauthorized"
        assert "Authorization: Bearer <key>" in r.json()["error"]["message"]
        assert wrong.json()["error"]["code"] == "invalid_api_key"
    # the hashed key as Bearer, the plaintext one as X-API-Key
    ok = await call(auth_service, method, path, body, Authorization=f"Bearer {ALICE_KEY}")
    assert ok.status_code == 200, ok.text
    ok = await call(auth_service, method, path, body, **{"X-API-Key": BOB_KEY})
    assert ok.status_code == 200, ok.text


@session_loop
async def test_refused_before_the_body_is_looked_at(auth_service):
    """Not the 422 of a bad body (FastAPI's path below the fast path) nor the explain
    route's: nothing protected is reached without a key."""
    for path, body in [("/v1/polarity", {"nope": 1}), ("/v1/polarity/explain", {"text": "x"})]:
        r = await call(auth_service, "POST", path, body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = await call(auth_service, "GET", "/v1/no-such-route", None)
    assert r.status_code == 401  # which routes exist is not told either


@session_loop
async def test_other_schemes_and_empty_keys_are_missing_credentials(auth_service):
    for headers in (
        {"Authorization": f"Basic {ALICE_KEY}"},
        {"Authorization": "Bearer"},
        {"X-API-Key": ""},
    ):
        r = await call(auth_service, "GET", "/v1/models", None, **headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "unauthorized", headers
        assert ALICE_KEY not in r.text


@session_loop
@pytest.mark.parametrize(("method", "path"), EXEMPT)
async def test_probes_metrics_docs_and_demo_files_need_no_key(auth_service, method, path):
    r = await call(auth_service, method, path, None)
    assert r.status_code == 200, (path, r.status_code, r.text[:200])


@session_loop
async def test_cors_preflight_allows_the_key_headers_and_the_401_is_readable(auth_service):
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization,x-api-key",
    }
    r = await call(auth_service, "OPTIONS", "/v1/polarity", None, **preflight)
    assert r.status_code == 200, r.text
    allowed = r.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "x-api-key" in allowed
    # a page of that origin can read the 401 (and so ask for a key)
    r = await call(auth_service, "POST", "/v1/polarity", {"text": "x"}, Origin=ORIGIN)
    assert r.status_code == 401
    assert r.headers["access-control-allow-origin"] == ORIGIN


@session_loop
async def test_no_method_or_path_spelling_gets_past_without_a_key(auth_service):
    """An OPTIONS that is no preflight (CorsMiddleware, outside, answers those) was let
    through and counted as the model's request (405), ``?model=`` label and all. Paths that
    only look like exempt ones are not routed to a protected endpoint either."""
    async with auth_service.client() as c:
        before = await read_metrics(c)
        for path in ("/v1/pos", f"/v1/pos?model={POS_MODEL}", "/v2/models/zz/infer"):
            r = await c.request("OPTIONS", path)
            assert r.status_code == 401, (path, r.text)
            error = r.json()["error"]
            assert (
                isinstance(error, str)
                if path.startswith("/v2")
                else error["code"] == "unauthorized"
            )
        body = {"text": "the dog runs"}
        for path in (
            "/healthz/../v1/pos",
            "//v1/pos",
            "/docs-assets/../v1/pos",
            "/static/..%2Fv1/pos",
            "/v1%2Fpos",
            "/%761/pos",
            "/v1/pos/",
            "/HEALTHZ",
            "/metrics/",
        ):
            # httpx would normalise the dot segments: the request line as written
            async with httpx.AsyncClient(base_url=c.base_url) as raw:
                req = raw.build_request("POST", "/", json=body)
                req.url = req.url.copy_with(raw_path=path.encode())
                r = await raw.send(req)
            assert r.status_code in (401, 404), (path, r.status_code, r.text)
        after = await read_metrics(c)
    # none of them is a model's request
    assert metric_value(after, "nlpserve_requests_total") == metric_value(
        before, "nlpserve_requests_total"
    )


@session_loop
async def test_openapi_declares_the_schemes_on_protected_operations_only(auth_service):
    schema = (await call(auth_service, "GET", "/openapi.json", None)).json()
    assert "requires an API key" in schema["info"]["description"]
    schemes = schema["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {**schemes["bearerAuth"], "type": "http", "scheme": "bearer"}
    assert schemes["apiKeyHeader"]["in"] == "header"
    assert schemes["apiKeyHeader"]["name"] == "X-API-Key"
    paths = schema["paths"]
    for path, method in [
        ("/v1/polarity", "post"),
        ("/v1/models", "get"),
        ("/v2/models/{name}/infer", "post"),
    ]:
        op = paths[path][method]
        assert op["security"] == [{"bearerAuth": []}, {"apiKeyHeader": []}], path
        assert "WWW-Authenticate" in op["responses"]["401"]["headers"]
    ref = paths["/v2/models/{name}/infer"]["post"]["responses"]["401"]["content"]
    assert ref["application/json"]["schema"]["$ref"].endswith("/V2ErrorResponse")
    for path in ("/healthz", "/readyz", "/metrics", "/v2/health/live"):
        assert "security" not in paths[path]["get"] and "401" not in paths[path]["get"]["responses"]


@session_loop
async def test_metrics_count_failures_by_reason_and_requests_by_client(auth_service):
    async with auth_service.client() as c:
        before = await read_metrics(c)
        await c.get("/v1/models")
        await c.get("/v1/models", headers={"X-API-Key": WRONG_KEY})
        await c.get("/v1/models", headers={"X-API-Key": BOB_KEY})
        after = await read_metrics(c)

    def delta(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    assert delta("nlpserve_auth_failures_total", reason="missing") == 1
    assert delta("nlpserve_auth_failures_total", reason="invalid") == 1
    assert delta("nlpserve_client_requests_total", client="bob") == 1
    assert delta("nlpserve_client_requests_total", client="alice") == 0
    assert metric_value(after, "nlpserve_api_keys_loaded") == 2
    # a refused request is no model's request: the service's own series do not count it
    assert delta("nlpserve_requests_total") == 0


@session_loop
async def test_the_client_is_a_log_field_and_no_key_is_ever_logged(auth_service, captured):
    captured.lines.clear()
    await call(auth_service, "GET", "/v1/models", None, **{"X-API-Key": BOB_KEY})
    await call(auth_service, "GET", "/v1/models", None, Authorization=f"Bearer {WRONG_KEY}")
    await call(auth_service, "GET", "/v1/models", None, Authorization=f"Bearer {ALICE_KEY}")
    records = [json.loads(line) for line in captured.lines]
    assert {r.get("client") for r in records} >= {"alice", "bob"}
    assert any("invalid_api_key" in r["message"] for r in records)
    every = "\n".join(captured.lines)
    for key in (ALICE_KEY, BOB_KEY, WRONG_KEY):
        assert key not in every


@session_loop
async def test_a_refusal_joins_the_callers_trace_and_names_no_client(auth_service, captured):
    """The auth middleware runs inside RequestIdMiddleware: its 401 carries the request id
    and the caller's trace, its log line their ids; the client of the request before (a
    context variable) is not carried over."""
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    given = f"00-{trace_id}-00f067aa0ba902b7-01"
    ok = await call(auth_service, "GET", "/v1/models", None, **{"X-API-Key": BOB_KEY})
    assert ok.status_code == 200
    captured.lines.clear()
    r = await call(
        auth_service, "GET", "/v1/models", None, traceparent=given, **{"X-Request-ID": "r-401"}
    )
    assert r.status_code == 401
    assert r.headers["x-request-id"] == "r-401"
    assert r.headers["traceparent"].startswith(f"00-{trace_id}-")
    assert r.headers["traceparent"] != given  # the server's own span
    refusals = [json.loads(x) for x in captured.lines if "refused" in x]
    assert len(refusals) == 1, captured.lines
    assert refusals[0]["request_id"] == "r-401" and refusals[0]["trace_id"] == trace_id
    assert "client" not in refusals[0]


# --------------------------------------------------------------------------- the file
def test_parse_keys_reads_hashes_plaintext_and_comments():
    keys = parse_keys(KEYS_FILE, "f")
    assert keys.keys == {digest(ALICE_KEY): "alice", digest(BOB_KEY): "bob"}
    assert keys.limits == {}


def test_a_client_may_have_several_keys_and_its_own_limit():
    """Rotation keeps the client's name (its limit, its series) over both keys; the limit
    is the client's, so its lines carry the same one."""
    text = (
        f"alice {ALICE_KEY} max_in_flight=8  # old key\n"
        f"alice {HASH_PREFIX}{digest(BOB_KEY).hex()} max_in_flight=8\n"
        f"carol {WRONG_KEY}\n"
    )
    keys = parse_keys(text, "f")
    assert keys.keys == {
        digest(ALICE_KEY): "alice",
        digest(BOB_KEY): "alice",
        digest(WRONG_KEY): "carol",
    }
    assert keys.limits == {"alice": 8} and keys.clients == {"alice", "carol"}


def test_a_client_line_may_give_its_rate_and_burst():
    """rate=R (items a second, any positive number) with an optional burst=B; without one
    the burst is the rate rounded up, at least 1. Lines of one client agree on both."""
    text = (
        f"alice {ALICE_KEY} rate=0.1 max_in_flight=8\n"
        f"alice {HASH_PREFIX}{digest(BOB_KEY).hex()} max_in_flight=8 rate=0.1 burst=1\n"
        f"bob {BOB_KEY}x burst=20 priority=batch rate=2.5\n"
        f"carol {WRONG_KEY} rate=4\n"
        f"dave {WRONG_KEY}x\n"
    )
    keys = parse_keys(text, "f")
    assert keys.rates == {"alice": Rate(0.1, 1), "bob": Rate(2.5, 20), "carol": Rate(4, 4)}
    assert keys.limits == {"alice": 8} and keys.priorities == {"bob": "batch"}
    line = key_line("erin", ALICE_KEY, 3, "batch", 0.5, 10)
    assert line.endswith(" max_in_flight=3 priority=batch rate=0.5 burst=10")
    assert parse_keys(line, "f").rates == {"erin": Rate(0.5, 10)}
    assert parse_keys(key_line("erin", ALICE_KEY, rate=7), "f").rates == {"erin": Rate(7, 7)}


def test_a_client_line_may_give_its_priority_in_either_order():
    text = (
        f"alice {ALICE_KEY} priority=batch max_in_flight=8\n"
        f"alice {HASH_PREFIX}{digest(BOB_KEY).hex()} max_in_flight=8 priority=batch\n"
        f"carol {WRONG_KEY} priority=interactive\n"
    )
    keys = parse_keys(text, "f")
    assert keys.limits == {"alice": 8}
    assert keys.priorities == {"alice": "batch", "carol": "interactive"}
    assert key_line("dave", ALICE_KEY, 3, "batch").endswith(" max_in_flight=3 priority=batch")
    assert parse_keys(key_line("dave", ALICE_KEY, None, "batch"), "f").priorities == {
        "dave": "batch"
    }


@pytest.mark.parametrize(
    ("text", "where", "why"),
    [
        ("alice\n", "f:1", "two fields"),
        ("# c\nalice a b c d e f\n", "f:2", "two fields"),
        (
            f"alice {BOB_KEY} max_in_flight=4\nalice {ALICE_KEY} max_in_flight=5\n",
            "f:2",
            "client 'alice' has max_in_flight=5 here but max_in_flight=4 on line 1",
        ),
        (
            f"alice {BOB_KEY}\n\nalice {ALICE_KEY} max_in_flight=5\n",
            "f:3",
            "has max_in_flight=5 here but no max_in_flight on line 1",
        ),
        (f"alice {BOB_KEY} max_in_flight=0\n", "f:1", "1 or more"),
        (f"alice {BOB_KEY} max_in_flight=-1\n", "f:1", "1 or more"),
        (f"alice {BOB_KEY} max_in_flight=lots\n", "f:1", "1 or more"),
        (f"alice {BOB_KEY} max_in_fligth=4\n", "f:1", "field 3 is not max_in_flight=N"),
        (f"alice {BOB_KEY} short-key\n", "f:1", "field 3 is not max_in_flight=N"),
        (f"alice {BOB_KEY} max_in_flight=4 x\n", "f:1", "field 4 is not max_in_flight=N"),
        (f"alice {BOB_KEY} a b c d e\n", "f:1", "two fields, or up to six"),
        (f"alice {BOB_KEY} rate=0\n", "f:1", "rate is items a second, a number above 0"),
        (f"alice {BOB_KEY} rate=-2\n", "f:1", "rate is items a second, a number above 0"),
        (f"alice {BOB_KEY} rate=fast\n", "f:1", "rate is items a second, a number above 0"),
        (f"alice {BOB_KEY} rate=inf\n", "f:1", "rate is items a second, a number above 0"),
        (f"alice {BOB_KEY} rate=nan\n", "f:1", "rate is items a second, a number above 0"),
        (f"alice {BOB_KEY} rate=2 burst=0\n", "f:1", "burst is a whole number of items"),
        (f"alice {BOB_KEY} rate=2 burst=1.5\n", "f:1", "burst is a whole number of items"),
        (f"alice {BOB_KEY} burst=4\n", "f:1", "burst=B needs rate=R on the line"),
        (f"alice {BOB_KEY} rate=1 rate=2\n", "f:1", "each at most once"),
        (f"alice {BOB_KEY} rat=1\n", "f:1", "field 3 is not max_in_flight=N, priority="),
        (
            f"alice {BOB_KEY} rate=2\nalice {ALICE_KEY} rate=3\n",
            "f:2",
            "client 'alice' has rate=3 burst=3 here but rate=2 burst=2 on line 1: the rate "
            "limit is the client's",
        ),
        (
            f"alice {BOB_KEY} rate=2 burst=8\nalice {ALICE_KEY} rate=2\n",
            "f:2",
            "client 'alice' has rate=2 burst=2 here but rate=2 burst=8 on line 1",
        ),
        (
            f"alice {BOB_KEY} rate=2\nalice {ALICE_KEY}\n",
            "f:2",
            "client 'alice' has no rate here but rate=2 burst=2 on line 1",
        ),
        (f"alice {BOB_KEY} priority=bulk\n", "f:1", "priority is interactive or batch"),
        (f"alice {BOB_KEY} priority=batch priority=batch\n", "f:1", "each at most once"),
        (
            f"alice {BOB_KEY} priority=batch\nalice {ALICE_KEY}\n",
            "f:2",
            "client 'alice' has no priority here but priority=batch on line 1",
        ),
        (f"alice {BOB_KEY}\nalice {BOB_KEY}\n", "f:2", "same key as 'alice' on line 1"),
        (f"alice {BOB_KEY}\nbob {BOB_KEY}\n", "f:2", "same key as 'alice' on line 1"),
        ("alice short-key\n", "f:1", "shorter than 16"),
        ("alice sha256:abc\n", "f:1", "64 hex digits"),
        (f"al/ce {BOB_KEY}\n", "f:1", "client name"),
        ("alice clé-non-ascii-0123456789\n", "f:1", "printable ASCII"),
        ("# nothing\n\n", "f", "holds no client"),
        ("", "f", "holds no client"),
    ],
)
def test_a_malformed_file_is_refused_naming_the_line(text, where, why):
    with pytest.raises(KeyFileError) as e:
        parse_keys(text, "f")
    message = str(e.value)
    assert message.startswith(f"{where}: ") and why in message
    assert "\n" not in message
    assert "short-key" not in message and BOB_KEY not in message  # keys never quoted


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NLPSERVE_")}
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=ROOT,
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_serve_refuses_a_malformed_keys_file_in_one_line(model_repo, tmp_path):
    path = tmp_path / "api-keys"
    path.write_text(f"alice {ALICE_KEY}\nbob tooshort\n")
    r = _cli(
        "serve", "--models", str(model_repo), NLPSERVE_API_KEYS_FILE=str(path), NLPSERVE_PORT="0"
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines == [
        f"nlpserve: invalid setting: NLPSERVE_API_KEYS_FILE: {path}:2: client 'bob': the key "
        "is 8 characters, shorter than 16 (`nlpserve keys new NAME` makes one)"
    ]
    missing = _cli("serve", NLPSERVE_API_KEYS_FILE=str(tmp_path / "nope"), NLPSERVE_PORT="0")
    assert missing.returncode == 2
    assert f"{tmp_path / 'nope'}: cannot be read" in missing.stderr
    assert ALICE_KEY not in r.stderr + r.stdout


# --------------------------------------------------------------------------- rotation
async def _until(check, timeout: float = 5.0) -> float:
    """Poll ``check()`` (async, -> bool) until true; the seconds it took."""
    t0 = time.monotonic()
    while not await check():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("not reached in time")
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


@session_loop
async def test_rotation_new_file_malformed_file_and_sighup(model_repo, tmp_path):
    # `nlpserve keys new` prints the key and the line that admits it
    made = _cli("keys", "new", "carol")
    assert made.returncode == 0, made.stderr
    carol_key, carol_line = made.stdout.splitlines()
    assert carol_line == key_line("carol", carol_key)
    assert carol_line.startswith(f"carol {HASH_PREFIX}")

    path = tmp_path / "api-keys"
    path.write_text(KEYS_FILE)
    settings = make_settings(model_repo, load_models=POLARITY_MODEL, api_keys_file=path)
    async with live_server(settings) as srv, srv.client() as c:

        async def status(key: str) -> int:
            return (await c.get("/v1/models", headers={"X-API-Key": key})).status_code

        assert await status(ALICE_KEY) == 200 and await status(carol_key) == 401
        path.write_text(carol_line + "\n")  # alice and bob out, carol in
        took = await _until(lambda: _is(status(carol_key), 200))
        assert took < 2.5
        assert await status(ALICE_KEY) == 401 and await status(BOB_KEY) == 401

        # a broken rewrite: the keys in force stay, the failure is counted and logged
        path.write_text(carol_line + "\nnot a valid line\n")
        await _until(lambda: _metric(c, "nlpserve_api_keys_reload_failures_total", 1), timeout=5)
        assert await status(carol_key) == 200 and await status(ALICE_KEY) == 401
        assert metric_value(await read_metrics(c), "nlpserve_api_keys_loaded") == 1

        # SIGHUP reads the file even when its mtime and size did not change
        path.write_text(f"{carol_line}\nbob {BOB_KEY}\n")
        await _until(lambda: _is(status(BOB_KEY), 200))  # read: the signature to keep
        before = path.stat()
        text = keys_text(alice=f"{HASH_PREFIX}{digest(ALICE_KEY).hex()}")
        text = text + "#" * (before.st_size - len(text))  # the same size
        path.write_text(text)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        await asyncio.sleep(1.2)  # a change check passes, sees nothing
        assert await status(carol_key) == 200
        handler = signal.getsignal(signal.SIGHUP)
        assert handler not in (signal.SIG_DFL, None), "the server did not take SIGHUP"
        os.kill(os.getpid(), signal.SIGHUP)
        await _until(lambda: _is(status(ALICE_KEY), 200))
        assert await status(carol_key) == 401
    assert signal.getsignal(signal.SIGHUP) in (signal.SIG_DFL, None)  # given back at stop


@session_loop
async def test_sighup_while_the_models_load_reloads_instead_of_ending_the_process(
    model_repo, tmp_path
):
    """SIGHUP's default action ends the process: the handler was installed only once the
    models had loaded, so a rotation's `kill -HUP` ended a replica that was still starting."""
    from service.api.app import create_app

    path = tmp_path / "api-keys"
    path.write_text(KEYS_FILE)
    settings = make_settings(model_repo, load_models=POLARITY_MODEL, api_keys_file=path)
    app = create_app(settings)
    state = app.state.service
    lifespan = app.router.lifespan_context(app)
    starting = asyncio.create_task(lifespan.__aenter__())
    await asyncio.sleep(0)  # the startup runs up to the model load (in a thread)
    try:
        assert not starting.done() and not state.runners
        handler = signal.getsignal(signal.SIGHUP)
        assert handler not in (signal.SIG_DFL, None), "SIGHUP would end a starting replica"
        path.write_text(f"carol {BOB_KEY}\n")
        os.kill(os.getpid(), signal.SIGHUP)
        await starting

        async def reloaded() -> bool:
            return sorted(state.api_keys.keys.values()) == ["carol"]

        await _until(reloaded)
    finally:
        await starting
        await lifespan.__aexit__(None, None, None)
    assert signal.getsignal(signal.SIGHUP) in (signal.SIG_DFL, None)


async def _is(value, want) -> bool:
    return await value == want


async def _metric(c: httpx.AsyncClient, name: str, want: float) -> bool:
    return metric_value(await read_metrics(c), name) == want


# --------------------------------------------------------------------------- Redis mode
@session_loop
async def test_redis_mode_authenticated_request_goes_through_a_worker(model_repo, keys_file):
    settings = make_settings(model_repo, load_models=POLARITY_MODEL, api_keys_file=keys_file)
    async with redis_backend(settings) as s, live_server(s) as srv, srv.client() as c:
        assert srv.state.settings.queue == "redis"
        body = {"text": "a wonderful film"}
        r = await c.post("/v1/polarity", json=body)
        assert r.status_code == 401
        r = await c.post(
            "/v1/polarity", json=body, headers={"Authorization": f"Bearer {ALICE_KEY}"}
        )
        assert r.status_code == 200, r.text
        assert r.json()["label"] in ("positive", "negative")
        assert srv.state.runners == {}  # this replica runs no model: a worker answered


def test_keys_new_refuses_a_name_the_file_would_refuse():
    from typer.testing import CliRunner

    from service.cli import app

    r = CliRunner().invoke(app, ["keys", "new", "two words"])
    assert r.exit_code == 2
    assert "invalid client name 'two words'" in r.output


# --------------------------------------------------------------------------- keys check
CHECKED_FILE = (
    "# a rotation, both limits, a priority, a default-only client\n"
    f"alice {HASH_PREFIX}{digest(ALICE_KEY).hex()} max_in_flight=9 priority=batch\n"
    f"alice {BOB_KEY}x   # alice's next key, plaintext\n"
    "carol carol-plaintext-key-5555544444 rate=0.5\n"
    f"dave {HASH_PREFIX}{'ab' * 32} burst=7 rate=2.5\n"
)


@session_loop
async def test_keys_check_prints_what_a_server_puts_in_force(model_repo, tmp_path):
    """A server on the same file and defaults: its limits and rates in force (the gauges,
    and each bucket's burst) are what `nlpserve keys check` printed."""
    path = tmp_path / "api-keys"
    path.write_text(
        CHECKED_FILE.replace(f"{BOB_KEY}x", f"{BOB_KEY}x max_in_flight=9 priority=batch")
    )
    env = {"NLPSERVE_CLIENT_MAX_IN_FLIGHT": "4", "NLPSERVE_CLIENT_RATE": "3"}
    r = _cli("keys", "check", str(path), **env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "alice keys=2 max_in_flight=9 priority=batch rate=3 burst=3",
        "carol keys=1 max_in_flight=4 priority=interactive rate=0.5 burst=1",
        "dave keys=1 max_in_flight=4 priority=interactive rate=2.5 burst=7",
    ]
    assert r.stderr.strip() == (
        f"{path}: 3 clients, 4 keys; a client without its own max_in_flight or rate has "
        "NLPSERVE_CLIENT_MAX_IN_FLIGHT=4, NLPSERVE_CLIENT_RATE=3, NLPSERVE_CLIENT_BURST=unset "
        "(this environment's)"
    )
    assert BOB_KEY not in r.stdout + r.stderr  # a plaintext key is never printed

    settings = make_settings(
        model_repo, load_models=POLARITY_MODEL, api_keys_file=path, client_max_in_flight=4,
        client_rate=3,
    )  # fmt: skip
    async with live_server(settings) as srv, srv.client() as c:
        text = await read_metrics(c)
        rates, keys = srv.state.client_rate, srv.state.api_keys
        assert rates is not None and keys is not None
        for line in r.stdout.splitlines():
            name, *fields = line.split()
            said = dict(f.split("=") for f in fields)
            held = metric_value(text, "nlpserve_client_max_in_flight", client=name)
            assert held == float(said["max_in_flight"]), line
            assert metric_value(text, "nlpserve_client_rate", client=name) == float(said["rate"])
            assert rates.rates[name].burst == int(said["burst"]), line
            assert keys.file.priorities.get(name, "interactive") == said["priority"]

    # no defaults: only the clients' own limits
    r = _cli("keys", "check", str(path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1] == (
        "carol keys=1 max_in_flight=none priority=interactive rate=0.5 burst=1"
    )


def test_keys_check_refuses_what_serve_refuses_in_the_same_line(model_repo, tmp_path):
    path = tmp_path / "api-keys"
    # alice's two lines disagree: a rollout of this file would keep the old keys everywhere
    path.write_text(CHECKED_FILE)
    r = _cli("keys", "check", str(path))
    assert r.returncode == 2 and not r.stdout
    served = _cli(
        "serve", "--models", str(model_repo), NLPSERVE_API_KEYS_FILE=str(path), NLPSERVE_PORT="0"
    )
    assert served.returncode == 2
    why = (
        f"{path}:3: client 'alice' has no max_in_flight here but max_in_flight=9 on line 2: "
        "the limit is the client's, over all its keys; give its lines the same one"
    )
    assert r.stderr.strip() == f"nlpserve: invalid keys file: {why}"
    assert served.stderr.strip() == f"nlpserve: invalid setting: NLPSERVE_API_KEYS_FILE: {why}"
    assert BOB_KEY not in r.stderr
    missing = _cli("keys", "check", str(tmp_path / "nope"))
    assert missing.returncode == 2 and f"{tmp_path / 'nope'}: cannot be read" in missing.stderr
    # the environment's defaults are checked as serve checks them
    path.write_text(f"carol {BOB_KEY}\n")
    r = _cli("keys", "check", str(path), NLPSERVE_CLIENT_BURST="5")
    assert r.returncode == 2 and not r.stdout
    assert "NLPSERVE_CLIENT_BURST is the burst of NLPSERVE_CLIENT_RATE's rate" in r.stderr

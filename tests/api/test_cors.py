"""CORS (``NLPSERVE_CORS_ALLOW_ORIGINS``): browser pages of other origins calling the API.

The protocol is checked with HTTP requests as a browser sends them, then end to end in the
system Chromium (skipped without one, as tests/test_demo_page.py): a page of another origin
reads an answer and its headers, and a page of an origin not listed cannot. The pages there
are real loopback pages (Chromium refuses a page it does not know to be local any request to
a loopback address, whatever CORS says), of "localhost" origins: another origin than the
API's "127.0.0.1" at the same port.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from pydantic import ValidationError

from service.config import parse_origins
from tests import test_demo_page
from tests.service_support import (
    DETECT_MODEL,
    LiveServer,
    live_server,
    make_settings,
    metric_value,
    read_metrics,
    require_model,
)

session_loop = pytest.mark.asyncio(loop_scope="session")

ALLOWED = "http://localhost:9"
OTHER = "http://localhost:10"
PREFLIGHT = {
    "Origin": ALLOWED,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "content-type,x-request-id",
}

browser = test_demo_page.browser  # the system Chromium fixture (skips without one)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def cors_service(model_repo) -> AsyncIterator[LiveServer]:
    """Its own pages' "localhost" origin is listed (the port is chosen first for that)."""
    require_model(model_repo, DETECT_MODEL)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    origins = f"{ALLOWED}, https://app.example.com, {local_origin(port)}"
    settings = make_settings(model_repo, port=port, cors_allow_origins=origins)
    async with live_server(settings) as srv:
        yield srv


def local_origin(port: int) -> str:
    return f"http://localhost:{port}"


@session_loop
async def test_preflight_of_a_listed_origin_is_allowed_and_not_counted(cors_service):
    async with cors_service.client() as c:
        before = metric_value(await read_metrics(c), "nlpserve_requests_total")
        r = await c.options("/v1/detect", headers=PREFLIGHT)
        after = metric_value(await read_metrics(c), "nlpserve_requests_total")
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in r.headers["access-control-allow-methods"]
    allowed = r.headers["access-control-allow-headers"].lower()
    assert "content-type" in allowed and "x-request-id" in allowed
    assert r.headers["access-control-max-age"] == "600"
    assert r.headers["x-request-id"]
    assert after == before  # a preflight is no prediction


@pytest.mark.parametrize(
    ("headers", "refused"),
    [
        ({**PREFLIGHT, "Origin": OTHER}, "origin"),
        ({**PREFLIGHT, "Access-Control-Request-Method": "DELETE"}, "method"),
        ({**PREFLIGHT, "Access-Control-Request-Headers": "x-not-allowed"}, "headers"),
    ],
)
@session_loop
async def test_refused_preflight_is_an_api_error(cors_service, headers, refused):
    async with cors_service.client() as c:
        r = await c.options("/v1/detect", headers=headers)
    assert r.status_code == 400
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error["code"] == "cors_preflight_refused"
    assert f"refused ({refused})" in error["message"]
    assert "NLPSERVE_CORS_ALLOW_ORIGINS" in error["message"]
    assert r.headers["x-request-id"]


@session_loop
async def test_refused_preflight_under_v2_is_in_that_protocols_error_shape(cors_service):
    """Every error under /v2 is ``{"error": "<message>"}``; this one was /v1's shape."""
    async with cors_service.client() as c:
        r = await c.options(
            f"/v2/models/{DETECT_MODEL}/infer", headers={**PREFLIGHT, "Origin": OTHER}
        )
        allowed = await c.options(f"/v2/models/{DETECT_MODEL}/infer", headers=PREFLIGHT)
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    assert set(r.json()) == {"error"}
    assert r.json()["error"].startswith("CORS preflight refused (origin)"), r.text
    assert r.headers["x-request-id"]
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ALLOWED


@session_loop
@pytest.mark.parametrize("fast_path", [True, False])
async def test_answers_and_errors_carry_the_cors_headers(model_repo, fast_path):
    """The fast path and FastAPI's stack alike; a 422 too, so a page can show its message."""
    require_model(model_repo, DETECT_MODEL)
    settings = make_settings(model_repo, cors_allow_origins=ALLOWED, fast_path=fast_path)
    async with live_server(settings) as srv, srv.client() as c:
        ok = await c.post("/v1/detect", json={"text": "a text"}, headers={"Origin": ALLOWED})
        bad = await c.post("/v1/detect", json={"text": ""}, headers={"Origin": ALLOWED})
        other = await c.post("/v1/detect", json={"text": "a text"}, headers={"Origin": OTHER})
    assert ok.status_code == 200 and bad.status_code == 422
    for r in (ok, bad):
        assert r.headers["access-control-allow-origin"] == ALLOWED
        exposed = r.headers["access-control-expose-headers"].lower()
        assert {"x-request-id", "server-timing", "retry-after"} <= set(exposed.split(", "))
        assert "origin" in r.headers["vary"].lower()
    # Served (CORS is the browser's to enforce), but with nothing that lets a page read it.
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers


@session_loop
async def test_a_simple_request_is_answered_without_a_preflight(cors_service):
    """A page's `fetch(url, {method: "POST", body: JSON.stringify(...)})` sends its string as
    text/plain: a CORS-simple request, no preflight first (docs/deploy.md said JSON bodies
    always made one). The API reads it as JSON and lets the listed origin read the answer."""
    async with cors_service.client() as c:
        r = await c.post(
            "/v1/detect",
            content=b'{"text": "a text"}',
            headers={"Origin": ALLOWED, "Content-Type": "text/plain;charset=UTF-8"},
        )
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ALLOWED


@session_loop
async def test_without_the_setting_no_cors_headers(client):
    r = await client.post("/v1/detect", json={"text": "a text"}, headers={"Origin": ALLOWED})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    pre = await client.options("/v1/detect", headers=PREFLIGHT)
    assert pre.status_code == 405 and "access-control-allow-origin" not in pre.headers


def test_any_origin():
    assert parse_origins(" * ") == ["*"]
    # as browsers send them: a port other than the scheme's default, an IPv6 literal
    listed = "http://localhost:3000,https://app.example.com:8443,http://[::1]:8080,http://[::1]"
    assert parse_origins(listed) == listed.split(",")
    settings = make_settings(Path("."), cors_allow_origins="*")
    assert settings.cors_origins() == ["*"]
    assert make_settings(Path("."), cors_allow_origins="  ").cors_origins() == []
    assert make_settings(Path(".")).cors_origins() == []


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("https://app.example.com/", "not an origin"),  # a trailing slash never matches
        ("https://app.example.com/page", "not an origin"),
        ("app.example.com", "not an origin"),
        ("ftp://files.example.com", "not an origin"),
        ("https://app.example.com:x", "port is not a number"),
        ("https://App.Example.com", "lower case"),
        ("https://a.example.com,*", "give it alone"),
        ("https://app.example.com:99999", "port is not a number"),
        # Accepted once, yet a browser never sends them so: its origin leaves out the
        # scheme's default port and any user info, and writes the port as a plain number.
        ("https://app.example.com:443", "sends this origin as 'https://app.example.com'"),
        ("http://localhost:80", "sends this origin as 'http://localhost'"),
        ("http://user@localhost:3000", "sends this origin as 'http://localhost:3000'"),
        ("http://localhost:", "sends this origin as 'http://localhost'"),
        ("http://localhost:03000", "sends this origin as 'http://localhost:3000'"),
    ],
)
def test_a_value_that_no_browser_would_match_is_refused(value, says):
    with pytest.raises(ValidationError) as e:
        make_settings(Path("."), cors_allow_origins=value)
    assert "cors_allow_origins" in str(e.value) and says in str(e.value)


_FETCH = """async (url) => {
  try {
    const r = await fetch(url, {method: "POST", body: JSON.stringify({text: "a text"}),
      headers: {"Content-Type": "application/json", "X-Request-ID": "from-the-page"}});
    return {status: r.status, body: await r.json(), requestId: r.headers.get("X-Request-ID"),
            timing: r.headers.get("Server-Timing")};
  } catch (e) { return {error: String(e)}; }
}"""


@session_loop
async def test_a_page_of_a_listed_origin_calls_the_api_in_a_browser(
    browser, cors_service, inprocess_service
):
    """Chromium sends the preflight (JSON and X-Request-ID make the request non-simple),
    then the POST, and lets the page read the answer and the exposed headers; a page of
    another origin (another server's) is refused the answer."""
    api = f"{cors_service.url}/v1/detect"
    page = await browser.new_page()
    try:
        await page.goto(f"{local_origin(cors_service.port)}/")  # the demo page: any will do
        got = await page.evaluate(_FETCH, api)
        assert got.get("status") == 200, got
        assert got["body"]["label"] in ("human", "machine")
        assert got["requestId"] == "from-the-page"
        assert got["timing"] and "inference;dur=" in got["timing"]

        await page.goto(f"{local_origin(inprocess_service.port)}/")
        refused = await page.evaluate(_FETCH, api)
        assert "error" in refused and "Failed to fetch" in refused["error"], refused
    finally:
        await page.close()

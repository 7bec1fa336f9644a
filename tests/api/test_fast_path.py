"""The prediction fast path (service/api/fast_path.py) answers exactly what FastAPI answers.

Two live servers on the same tiny models, one with NLPSERVE_FAST_PATH on (the default) and
one with it off, get the same requests: good ones, and each kind of bad one. The answers
must be the same (status, body, error code and message), and a counter in front of the
FastAPI stack tells which requests the fast path took itself.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import pytest_asyncio

from service.api.fast_path import PredictFastPath
from tests.service_support import (
    DETECT_MODEL,
    POLARITY_MODEL,
    POS_MODEL,
    QA_MODEL,
    live_server,
    make_settings,
    require_model,
    rounded,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

LIMITS = dict(max_text_chars=300, max_batch_items=3)
TEXT = "additionally it is important to note that overall there are several factors"


class _Counting:
    """ASGI wrapper counting the requests that reach the FastAPI stack behind the fast path."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.calls = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            self.calls += 1
        await self.app(scope, receive, send)


def _fast_path(app) -> PredictFastPath | None:
    layer = app.middleware_stack
    while layer is not None:
        if isinstance(layer, PredictFastPath):
            return layer
        layer = getattr(layer, "app", None)
    return None


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pair(model_repo):
    for name in (DETECT_MODEL, POLARITY_MODEL, POS_MODEL, QA_MODEL):
        require_model(model_repo, name)
    async with (
        live_server(make_settings(model_repo, fast_path=True, **LIMITS)) as on,
        live_server(make_settings(model_repo, fast_path=False, **LIMITS)) as off,
    ):
        fast = _fast_path(on.app)
        assert fast is not None, "NLPSERVE_FAST_PATH=true must install the fast path"
        assert _fast_path(off.app) is None
        behind = fast.app = _Counting(fast.app)
        async with on.client() as con, off.client() as coff:
            yield con, coff, behind


async def _both(pair, path: str, **kw: Any) -> tuple[httpx.Response, bool]:
    """(the fast-path server's answer, whether its fast path answered it itself), after
    checking the answer against the FastAPI-only server's."""
    con, coff, behind = pair
    before = behind.calls
    r_on = await con.post(path, **kw)
    r_off = await coff.post(path, **kw)
    assert r_on.status_code == r_off.status_code, (r_on.text, r_off.text)
    assert r_on.headers["content-type"] == r_off.headers["content-type"]
    assert rounded(r_on.json()) == rounded(r_off.json())
    assert r_on.headers["x-request-id"]
    return r_on, behind.calls == before


GOOD = [
    ("/v1/detect", {"json": {"text": TEXT}}),
    ("/v1/detect", {"json": {"inputs": [{"text": TEXT}, {"text": "i think so lol"}]}}),
    ("/v1/polarity", {"json": {"text": "a charming, funny film"}}),
    (f"/v1/polarity?model={POLARITY_MODEL}", {"json": {"text": "dull and far too long"}}),
    ("/v1/pos", {"json": {"tokens": ["the", "cats", "chased", "a", "bird"]}}),
    ("/v1/qa", {"json": {"question": "长城有多长？", "context": "长城总长度超过两万千米。"}}),
    # curl -d sends a form content type; the API reads every POST body as JSON.
    ("/v1/detect", {"content": f'{{"text": "{TEXT}"}}'.encode(),
                    "headers": {"content-type": "application/x-www-form-urlencoded"}}),
]  # fmt: skip


@pytest.mark.parametrize(("path", "kw"), GOOD)
async def test_good_requests_are_answered_by_the_fast_path(pair, path, kw):
    r, fast = await _both(pair, path, **kw)
    assert r.status_code == 200, r.text
    assert fast


# Errors raised once the body is valid: the fast path answers them with the app's handlers.
HANDLED = [
    ("/v1/detect?model=nope", {"json": {"text": TEXT}}, 404, "model_not_found"),
    (f"/v1/detect?model={POLARITY_MODEL}", {"json": {"text": TEXT}}, 404, "model_not_found"),
    ("/v1/detect", {"json": {"inputs": [{"text": "a"}] * 4}}, 422, "too_many_items"),
    # over the limit: refused before its (invalid) items are validated
    ("/v1/detect", {"json": {"inputs": [{}] * 1000}}, 422, "too_many_items"),
    ("/v1/detect", {"json": {"text": "x" * 301}}, 422, "text_too_long"),
    ("/v1/detect", {"json": {"text": TEXT}, "headers": {"X-Deadline-Ms": "soon"}}, 400,
     "invalid_header"),
]  # fmt: skip

# Bodies that fail parsing or validation, and queries it does not interpret: FastAPI's.
HANDED_ON = [
    ("/v1/detect", {"content": b"not json"}, 400, "invalid_json"),
    ("/v1/detect", {"content": b"[" * 5000}, 400, "invalid_json"),  # nested past json's limit
    ("/v1/detect", {"json": {"txt": TEXT}}, 422, None),
    ("/v1/detect", {"json": {"text": ""}}, 422, "empty_text"),
    ("/v1/detect", {"json": {"inputs": []}}, 422, "empty_inputs"),
    ("/v1/detect?verbose=1", {"json": {"text": TEXT}}, 422, "unknown_parameter"),
    ("/v1/detect?model=a&model=b", {"json": {"text": TEXT}}, 422, "unknown_parameter"),
    ("/v1/detect/explain", {"json": {"txt": TEXT}}, 422, None),  # not a fast-path route
]


@pytest.mark.parametrize(("path", "kw", "status", "code"), HANDLED)
async def test_errors_after_validation_come_from_the_app_handlers(pair, path, kw, status, code):
    r, fast = await _both(pair, path, **kw)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert fast


@pytest.mark.parametrize(("path", "kw", "status", "code"), HANDED_ON)
async def test_everything_else_goes_down_the_fastapi_stack(pair, path, kw, status, code):
    r, fast = await _both(pair, path, **kw)
    assert r.status_code == status, r.text
    if code is not None:
        assert r.json()["error"]["code"] == code
    assert not fast


async def test_body_over_the_limit_is_413_without_dropping_the_connection(model_repo):
    require_model(model_repo, DETECT_MODEL)

    async def chunks():  # chunked: no Content-Length, the limit is found while reading
        yield b'{"text": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    settings = make_settings(model_repo, max_body_bytes=4000)
    async with live_server(settings) as srv, srv.client() as c:
        r = await c.post("/v1/detect", content=chunks())
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == "body_too_large"
        assert (await c.post("/v1/detect", json={"text": TEXT})).status_code == 200

"""Property-based fuzzing of the HTTP API against its own ``/openapi.json`` (schemathesis).

Two live servers on the tiny models, one with the prediction fast path (the default) and one
without. For every operation of the schema, schemathesis generates requests that fit it and
requests that break it (wrong types, missing or unknown fields, out-of-range values, odd
headers and query parameters) and sends them over real HTTP. Every answer must:

* never be a 500 (bad input is a 4xx; a 5xx only where documented: 501/503/504);
* have a status, content type and body that the schema documents for that operation;
* be ``{"error": {"code", "message"}}`` when it is an error (under ``/v2``, the V2 protocol's
  ``{"error": "<message>"}``);
* and, for ``POST /v1/<task>``, be the same from the fast path as from FastAPI's routes.

A third test sends raw bodies beyond the schema (any JSON shape with the endpoints' keys, the
values fuzzers find hard, bodies broken at a random byte) to both servers: same answers.

Bounded and deterministic (derandomized, a fixed number of examples per operation and mode,
no example database) for CI: ~25-35 s on 2 cores, about half of it the two servers' start-up
and shap's warm-up.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
import pytest_asyncio

from service.explain.engine import shap_available
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

schemathesis = pytest.importorskip("schemathesis", reason="the dev extra is not installed")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, Phase, given  # noqa: E402
from hypothesis import settings as hsettings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

# Small limits keep generated bodies small (the schema announces them: maxItems, maxLength,
# max_evals' maximum); a small explanation budget keeps SHAP calls to milliseconds.
LIMITS = dict(
    max_text_chars=200,
    max_batch_items=3,
    explain_max_evals_limit=24,
    explain_max_evals_default=12,
    default_deadline_ms=10_000,
)
EXAMPLES = {GenerationMode.POSITIVE: 10, GenerationMode.NEGATIVE: 10}
CHECKS = [
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# 5xx the schema documents and the service may answer without a bug: 501 (no shap), 503
# (not ready), 504 (a generated X-Deadline-Ms of a few ms expires: deadline_exceeded).
EXPECTED_5XX = {501, 503, 504}
PREDICT_PATHS = {"/v1/pos", "/v1/polarity", "/v1/detect", "/v1/qa"}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def servers(model_repo):
    for name in (DETECT_MODEL, POLARITY_MODEL, POS_MODEL, QA_MODEL):
        require_model(model_repo, name)
    async with (
        live_server(make_settings(model_repo, fast_path=True, **LIMITS)) as on,
        live_server(make_settings(model_repo, fast_path=False, **LIMITS)) as off,
    ):
        if shap_available():  # shap's import and JIT once, not in a generated request's time
            from service.api.routes.explain import warm_up_explain

            await asyncio.gather(warm_up_explain(on.app), warm_up_explain(off.app))
        yield on, off


def _error_shape(r: Any, what: str, v2: bool = False) -> None:
    if r.status_code >= 400:
        body = json.loads(r.content)
        if v2:
            assert set(body) == {"error"} and isinstance(body["error"], str), (what, body)
            assert body["error"], (what, body)
            return
        error = body["error"]
        # a limit only on the refusals that a limit is the cause of (docs/service.md, Errors)
        limited = error.get("code") in ("too_many_items", "client_quota", "client_rate")
        fields = {"code", "message"} | ({"limit"} if limited or r.status_code == 413 else set())
        assert set(body) == {"error"} and set(error) == fields, (what, body)
        assert error["code"] and error["message"], (what, body)
        if "limit" in error:
            assert set(error["limit"]) == {"name", "value"}, (what, body)


def _comparable(r: Any) -> Any:
    """What must match between the fast path and FastAPI: the status and the whole body
    (errors: code and message; results rounded, as the same int8 input alone is
    deterministic but float printing is not the point)."""
    return r.status_code, rounded(json.loads(r.content))


def _check_operation(op: Any, mode: Any, n: int, on_url: str, off_url: str, seen: dict) -> Any:
    """A hypothesis test of ``n`` generated requests of one operation in one mode."""
    label = f"{op.method.upper()} {op.path} ({mode.value})"
    predict = op.method.upper() == "POST" and op.path in PREDICT_PATHS

    @hsettings(
        max_examples=n,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: report as found
        suppress_health_check=list(HealthCheck),
    )
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case) -> None:
        r = case.call(base_url=on_url, timeout=30)
        what = f"{label}: {case.as_curl_command()[:600]}\n-> {r.status_code} {r.text[:300]}"
        assert r.status_code != 500, what
        assert r.status_code < 500 or r.status_code in EXPECTED_5XX, what
        _error_shape(r, what, v2=op.path.startswith("/v2"))
        case.validate_response(r, checks=CHECKS)
        if mode is GenerationMode.NEGATIVE and r.status_code != 413:  # too large: refused too
            case.validate_response(r, checks=[negative_data_rejection])
        if predict:
            r_off = case.call(base_url=off_url, timeout=30)
            if 504 not in (r.status_code, r_off.status_code):  # a race, not the path
                assert _comparable(r) == _comparable(r_off), what
        seen[label] = seen.get(label, 0) + 1

    return run


def _breakable(operation: dict[str, Any]) -> bool:
    """Whether a request can violate the operation's schema: it has a body or a parameter
    other than a string in the path."""
    return "requestBody" in operation or any(
        p["in"] != "path" or p.get("schema", {}).get("type") != "string"
        for p in operation.get("parameters", [])
    )


def _fuzz(spec: dict[str, Any], on_url: str, off_url: str) -> dict[str, int]:
    """Runs in a thread: the servers keep serving on the test's event loop meanwhile."""
    schema = schemathesis.openapi.from_dict(spec)
    seen: dict[str, int] = {}
    for result in schema.get_all_operations():
        op = result.ok()
        raw = spec["paths"][op.path][op.method.lower()]
        for mode, n in EXAMPLES.items():
            if mode is GenerationMode.NEGATIVE and not _breakable(raw):
                continue  # nothing to break (/healthz; /v1/models/{name}: any name is a string)
            _check_operation(op, mode, n, on_url, off_url, seen)()
    return seen


async def test_every_operation_answers_within_its_schema(servers):
    on, off = servers
    async with on.client() as c:
        spec = (await c.get("/openapi.json")).json()
    on_url, off_url = on.url, off.url
    seen = await asyncio.to_thread(_fuzz, spec, on_url, off_url)
    operations = {(m.upper(), p) for p, item in spec["paths"].items() for m in item}
    # four predictions, two explanations, five GET endpoints; V2: two inferences, seven GETs
    assert len(operations) == 20
    tested = {tuple(label.split(" (")[0].split(" ", 1)) for label in seen}
    assert tested == operations
    # every body operation got its examples (a GET without parameters has one request)
    assert all(n == 10 for label, n in seen.items() if label.startswith("POST")), seen
    assert sum("(negative)" in label for label in seen) == 8  # everything with a body


async def test_the_schema_states_this_servers_limits(servers):
    """/openapi.json announces the limits the server enforces (its settings), so a client or
    a fuzzer generating from it does not send what could only get a 422: inputs up to
    NLPSERVE_MAX_BATCH_ITEMS (it said 10,000), texts of 1 to NLPSERVE_MAX_TEXT_CHARS
    characters (it said any length), max_evals up to NLPSERVE_EXPLAIN_MAX_EVALS_LIMIT."""
    on, _ = servers
    async with on.client() as c:
        schemas = (await c.get("/openapi.json")).json()["components"]["schemas"]
    for name in ("PosBatchRequest", "PolarityBatchRequest", "DetectBatchRequest", "QABatchRequest"):
        assert schemas[name]["properties"]["inputs"]["maxItems"] == 3, name
    texts = [
        schemas["PolarityRequest"]["properties"]["text"],
        schemas["DetectRequest"]["properties"]["text"],
        schemas["QARequest"]["properties"]["question"],
        schemas["QARequest"]["properties"]["context"],
        schemas["ExplainRequest"]["properties"]["text"],
        next(
            s for s in schemas["PosRequest"]["properties"]["text"]["anyOf"] if s["type"] != "null"
        ),
    ]
    for text in texts:
        assert (text["type"], text["minLength"], text["maxLength"]) == ("string", 1, 200), text
    tokens = next(
        s for s in schemas["PosRequest"]["properties"]["tokens"]["anyOf"] if s["type"] == "array"
    )
    # the limit is on the words joined, not on each word
    assert tokens["items"]["minLength"] == 1 and "maxLength" not in tokens["items"]
    assert "x-nlpserve-text" not in str(schemas)
    evals = next(
        s for s in schemas["ExplainRequest"]["properties"]["max_evals"]["anyOf"] if "type" in s
    )
    assert (evals["minimum"], evals["maximum"]) == (4, 24)
    # and the server holds to them, at the bounds
    async with on.client() as c:
        for body, status in [
            ({"text": "a" * 200}, 200),
            ({"text": "a" * 201}, 422),
            ({"inputs": [{"text": "a"}] * 3}, 200),
            ({"inputs": [{"text": "a"}] * 4}, 422),
        ]:
            assert (await c.post("/v1/polarity", json=body)).status_code == status, body


# ---------------------------------------------------------------------------- raw bodies
# Beyond the schema: JSON of any shape with the endpoints' own keys, the values fuzzers find
# hard (lone surrogates, NUL, zero-width and over-long text, NaN/Infinity, huge integers,
# nesting), and bodies broken at a random byte.
_KEYS = st.sampled_from(
    ["text", "tokens", "inputs", "question", "context", "max_evals", "txt", "k\ud800"]
)
_TEXT = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["\ud800", "a\udfffb", "\x00", "a\x00b", "\u200b", " \t", "[SEP]", "x" * 201]),
)
_SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(),  # NaN and ±Infinity too: json.dumps writes them as NaN, Infinity
    _TEXT,
)
_VALUE = st.recursive(
    _SCALAR,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(_KEYS, inner, max_size=4)),
    max_leaves=12,
)
_DOC = st.one_of(st.dictionaries(_KEYS, _VALUE, max_size=4), _VALUE)


@st.composite
def _raw_request(draw: Any) -> tuple[str, bytes, dict[str, str]]:
    path = draw(st.sampled_from(sorted(PREDICT_PATHS)))
    path += draw(st.sampled_from(["", "", "?model=pos-en", "?model=", "?x=1", "?model=a&model=b"]))
    body = json.dumps(draw(_DOC)).encode()
    if draw(st.integers(0, 3)) == 0:  # broken: bytes cut out or put in at a random place
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(st.binary(max_size=3)) + body[at + draw(st.integers(0, 2)) :]
    headers = draw(st.sampled_from([{}, {}, {"X-Deadline-Ms": "5000"}, {"X-Deadline-Ms": "0"}]))
    return path, body, headers


def _raw_parity(on_url: str, off_url: str) -> int:
    sent = 0
    with (
        httpx.Client(base_url=on_url, timeout=30) as on,
        httpx.Client(base_url=off_url, timeout=30) as off,
    ):

        @hsettings(
            max_examples=80,
            derandomize=True,
            database=None,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(request=_raw_request())
        def run(request: tuple[str, bytes, dict[str, str]]) -> None:
            nonlocal sent
            path, body, headers = request
            r = on.post(path, content=body, headers=headers)
            what = f"POST {path} {headers} {body[:300]!r} -> {r.status_code} {r.text[:300]}"
            assert r.status_code < 500, what
            _error_shape(r, what)
            r_off = off.post(path, content=body, headers=headers)
            assert _comparable(r) == _comparable(r_off), what
            sent += 1

        run()
    return sent


async def test_the_fast_path_answers_any_body_as_fastapi_does(servers):
    """The fast path takes what validates and hands the rest to FastAPI: whatever the body,
    both servers answer the same status, code and message (and no 5xx)."""
    on, off = servers
    assert await asyncio.to_thread(_raw_parity, on.url, off.url) == 80

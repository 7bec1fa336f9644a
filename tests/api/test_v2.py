"""The Open Inference Protocol (KServe V2, JSON REST) under /v2, over real HTTP against the
tiny trained models: the same answers as /v1 for the same inputs, the protocol's metadata
and probes, and every error in its ``{"error": "<message>"}`` shape with /v1's status."""

from __future__ import annotations

import asyncio
import json
import math
import socket
from typing import Any

import httpx
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from service import __version__
from tests.api import test_errors
from tests.service_support import (
    DETECT_MODEL,
    POLARITY_MODEL,
    POS_MODEL,
    QA_MODEL,
    live_server,
    make_settings,
    metric_value,
    read_metrics,
    require_model,
    wait_for,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODELS = (DETECT_MODEL, POLARITY_MODEL, POS_MODEL, QA_MODEL)
DETECT_TEXTS = [
    "i think my dog ate it lol yeah the bus was late again tbh",
    "additionally it is important to note that overall there are several factors",
    "furthermore in conclusion",
]
POLARITY_TEXTS = ["A charming, funny and moving film.", "Dull, tedious and far too long.", "ok"]
POS_TEXTS = ["The dog barks.", "She likes red cars .", "Mr. Smith paid $ 5 in the 1980s."]
QA_PAIRS = [
    ("中国的首都是哪里？", "中国的首都是北京，它有三千多年的历史。"),
    ("谁被称为诗仙？", "李白是唐代著名诗人，被称为诗仙。"),
    ("长城有多长？", "长城总长度超过两万千米，是世界奇迹。"),
]


@pytest.fixture(autouse=True)
def _all_models(model_repo):
    for name in MODELS:
        require_model(model_repo, name)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def fp32(model_repo):
    """fp32 everywhere: answers that do not move with batch-mates (int8's do), so a V2
    batch and a /v1 batch of the same items must agree to float32 rounding."""
    async with live_server(make_settings(model_repo, variant="fp32")) as srv:
        yield srv


# /v1's error tests' server of small limits (this module's own instance) and its client:
# a V2 error must get the status /v1 gives for the same cause under the same limits
limited = test_errors.limited
lc = test_errors.lc


def texts(name: str, data: list[Any], shape: list[int] | None = None) -> dict[str, Any]:
    return {"name": name, "shape": shape or [len(data)], "datatype": "BYTES", "data": data}


def infer_body(model: str, n: int) -> dict[str, Any]:
    """A V2 request of the first ``n`` texts (or QA pairs) of ``model``'s task."""
    if model == QA_MODEL:
        pairs = QA_PAIRS[:n]
        return {
            "inputs": [
                texts("question", [q for q, _ in pairs]),
                texts("context", [c for _, c in pairs]),
            ]
        }
    return {"inputs": [texts("text", V1_TEXTS[model][:n])]}


V1_TEXTS = {DETECT_MODEL: DETECT_TEXTS, POLARITY_MODEL: POLARITY_TEXTS, POS_MODEL: POS_TEXTS}
V1_PATHS = {DETECT_MODEL: "/v1/detect", POLARITY_MODEL: "/v1/polarity", POS_MODEL: "/v1/pos"}


async def v1_answers(c: httpx.AsyncClient, model: str, n: int) -> list[dict[str, Any]]:
    if model == QA_MODEL:
        items = [{"question": q, "context": ctx} for q, ctx in QA_PAIRS[:n]]
        path = "/v1/qa"
    else:
        items = [{"text": t} for t in V1_TEXTS[model][:n]]
        path = V1_PATHS[model]
    r = await c.post(path, json={"inputs": items})
    assert r.status_code == 200, r.text
    return r.json()["outputs"]


def outputs_of(r: httpx.Response) -> dict[str, dict[str, Any]]:
    assert r.status_code == 200, r.text
    return {o["name"]: o for o in r.json()["outputs"]}


def assert_same_answers(model: str, outs: dict[str, dict[str, Any]], v1: list[dict], labels):
    """The V2 outputs say what /v1 says of the same items (floats: to float32 rounding)."""
    n = len(v1)
    close = pytest.approx  # float32 rounding: relative 1e-6
    if model in (DETECT_MODEL, POLARITY_MODEL):
        assert set(outs) == {"label", "probability", "probabilities", "truncated"}
        want = {
            "name": "label",
            "datatype": "BYTES",
            "shape": [n],
            "data": [o["label"] for o in v1],
        }
        assert outs["label"] == want
        assert outs["truncated"]["data"] == [o["truncated"] for o in v1]
        assert outs["probabilities"]["shape"] == [n, len(labels)]
        assert outs["probabilities"]["datatype"] == outs["probability"]["datatype"] == "FP32"
        rows = outs["probabilities"]["data"]
        field = "machine_probability" if model == DETECT_MODEL else "positive_probability"
        column = labels.index("machine" if model == DETECT_MODEL else "positive")
        for i, o in enumerate(v1):
            row = rows[i * len(labels) : (i + 1) * len(labels)]
            assert row[column] == close(o[field], rel=1e-6)
            assert sum(row) == close(1.0, rel=1e-6)
            assert outs["probability"]["data"][i] == close(row[labels.index(o["label"])])
            assert outs["probability"]["data"][i] == close(max(row))
    elif model == POS_MODEL:
        assert set(outs) == {"tokens", "tags"}
        for name in ("tokens", "tags"):
            assert (outs[name]["datatype"], outs[name]["shape"]) == ("BYTES", [n])
            assert [json.loads(s) for s in outs[name]["data"]] == [o[name] for o in v1]
    else:
        assert set(outs) == {"answer", "score", "start", "end"}
        assert outs["answer"]["data"] == [o["answer"] for o in v1]
        assert (outs["start"]["datatype"], outs["end"]["datatype"]) == ("INT64", "INT64")
        assert outs["start"]["data"] == [o["start"] for o in v1]
        assert outs["end"]["data"] == [o["end"] for o in v1]
        assert outs["score"]["data"] == close([o["score"] for o in v1], rel=1e-6)


# ------------------------------------------------------------------ answers
@pytest.mark.parametrize("model", MODELS)
async def test_an_inference_answers_as_v1_does(client, service, model):
    """One text (QA: one pair) per request, in each queue backend (in-process and Redis):
    V2 and /v1 answer the same."""
    r = await client.post(f"/v2/models/{model}/infer", json=infer_body(model, 1))
    outs = outputs_of(r)
    assert r.json()["model_name"] == model and "id" not in r.json()
    assert r.json()["model_version"] == service.state.tasks[model].manifest.version
    assert r.headers["x-request-id"] and "inference;dur=" in r.headers["server-timing"]
    labels = service.state.tasks[model].manifest.labels
    assert_same_answers(model, outs, await v1_answers(client, model, 1), labels)


@pytest.mark.parametrize("model", MODELS)
async def test_a_batch_of_n_answers_as_v1_does(fp32, model):
    async with fp32.client() as c:
        r = await c.post(f"/v2/models/{model}/infer", json=infer_body(model, 3))
        labels = fp32.state.tasks[model].manifest.labels
        assert_same_answers(model, outputs_of(r), await v1_answers(c, model, 3), labels)


async def test_nested_data_is_read_row_major_and_outputs_are_flat(fp32):
    async with fp32.client() as c:
        flat = await c.post(
            f"/v2/models/{POLARITY_MODEL}/infer", json=infer_body(POLARITY_MODEL, 3)
        )
        nested = {"inputs": [texts("text", [[POLARITY_TEXTS[0]], POLARITY_TEXTS[1:]], [3])]}
        r = await c.post(f"/v2/models/{POLARITY_MODEL}/infer", json=nested)
    assert outputs_of(r) == outputs_of(flat)
    assert all(not isinstance(v, list) for o in r.json()["outputs"] for v in o["data"])


async def test_outputs_filter_and_order_id_and_version(inprocess_service):
    version = inprocess_service.state.tasks[DETECT_MODEL].manifest.version
    body = {
        "id": "req-7",
        "parameters": {"binary_data_output": True},  # tritonclient's default: JSON answers
        **infer_body(DETECT_MODEL, 2),
        "outputs": [
            {"name": "probabilities", "parameters": {"binary_data": True}},
            {"name": "label"},
        ],
    }
    async with inprocess_service.client() as c:
        for path in (f"/v2/models/{DETECT_MODEL}", f"/v2/models/{DETECT_MODEL}/versions/{version}"):
            r = await c.post(f"{path}/infer", json=body)
            assert r.status_code == 200, r.text
            answer = r.json()
            assert (answer["id"], answer["model_version"]) == ("req-7", version)
            assert [o["name"] for o in answer["outputs"]] == ["probabilities", "label"]
        r = await c.post(f"/v2/models/{DETECT_MODEL}/infer", json={**body, "outputs": []})
        assert [o["name"] for o in r.json()["outputs"]] == [
            "label",
            "probability",
            "probabilities",
            "truncated",
        ]


async def test_over_long_text_is_truncated_and_says_so(inprocess_service):
    task = inprocess_service.state.tasks[DETECT_MODEL]
    long = " ".join([DETECT_TEXTS[1]] * task.max_length)
    body = {"inputs": [texts("text", [DETECT_TEXTS[0], long])], "outputs": [{"name": "truncated"}]}
    async with inprocess_service.client() as c:
        r = await c.post(f"/v2/models/{DETECT_MODEL}/infer", json=body)
    assert outputs_of(r)["truncated"]["data"] == [False, True]


async def test_inferences_are_counted_per_model_as_predictions(inprocess_service):
    async with inprocess_service.client() as c:
        before = await read_metrics(c)
        r = await c.post(f"/v2/models/{POS_MODEL}/infer", json=infer_body(POS_MODEL, 1))
        assert r.status_code == 200
        bad = await c.post("/v2/models/no-such-model/infer", json=infer_body(POS_MODEL, 1))
        assert bad.status_code == 404
        after = await read_metrics(c)

    def count(text: str, **labels: str) -> float:
        return metric_value(text, "nlpserve_requests_total", endpoint="predict", **labels)

    assert (
        count(after, model=POS_MODEL, status="200")
        == count(before, model=POS_MODEL, status="200") + 1
    )
    assert (
        count(after, model="unknown", status="404")
        == count(before, model="unknown", status="404") + 1
    )
    stage = "nlpserve_request_stage_seconds_count"
    assert metric_value(after, stage, model=POS_MODEL) > metric_value(
        before, stage, model=POS_MODEL
    )


# ------------------------------------------------------------------ metadata and probes
async def test_server_metadata_and_health(client):
    for path in ("/v2", "/v2/"):
        r = await client.get(path)
        assert r.status_code == 200, r.text
        assert r.json() == {"name": "nlpserve", "version": __version__, "extensions": []}
    assert (await client.get("/v2/health/live")).json() == {"live": True}
    assert (await client.get("/v2/health/ready")).json() == {"ready": True}
    for path in ("/v2/health/live", "/v2/health/ready"):
        assert (await client.head(path)).status_code == 200


async def test_model_metadata_describes_the_v2_tensors(inprocess_service):
    tasks = inprocess_service.state.tasks
    async with inprocess_service.client() as c:
        got = {m: (await c.get(f"/v2/models/{m}")).json() for m in MODELS}
        version = tasks[QA_MODEL].manifest.version
        assert (await c.get(f"/v2/models/{QA_MODEL}/versions/{version}")).json() == got[QA_MODEL]
    for model, meta in got.items():
        assert (meta["name"], meta["platform"]) == (model, "onnxruntime_onnx")
        assert meta["versions"] == [tasks[model].manifest.version]
    text = [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    for model in (DETECT_MODEL, POLARITY_MODEL):
        labels = tasks[model].manifest.labels
        assert got[model]["inputs"] == text
        assert got[model]["outputs"] == [
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
            {"name": "probability", "datatype": "FP32", "shape": [-1]},
            {
                "name": "probabilities",
                "datatype": "FP32",
                "shape": [-1, len(labels)],
                "parameters": {"labels": labels},
            },
            {"name": "truncated", "datatype": "BOOL", "shape": [-1]},
        ]
    assert got[POS_MODEL]["inputs"] == text
    assert [(o["name"], o["datatype"]) for o in got[POS_MODEL]["outputs"]] == [
        ("tokens", "BYTES"),
        ("tags", "BYTES"),
    ]
    assert [i["name"] for i in got[QA_MODEL]["inputs"]] == ["question", "context"]
    assert [(o["name"], o["datatype"], o["shape"]) for o in got[QA_MODEL]["outputs"]] == [
        ("answer", "BYTES", [-1]),
        ("score", "FP32", [-1]),
        ("start", "INT64", [-1]),
        ("end", "INT64", [-1]),
    ]


async def test_model_ready_at_the_served_version_only(inprocess_service):
    version = inprocess_service.state.tasks[POS_MODEL].manifest.version
    async with inprocess_service.client() as c:
        for path in (
            f"/v2/models/{POS_MODEL}/ready",
            f"/v2/models/{POS_MODEL}/versions/{version}/ready",
        ):
            r = await c.get(path)
            assert r.status_code == 200 and r.json() == {"name": POS_MODEL, "ready": True}
        other = f"{version}0"
        for path in (
            f"/v2/models/{POS_MODEL}/versions/{other}/ready",
            f"/v2/models/{POS_MODEL}/versions/{other}",
            f"/v2/models/{POS_MODEL}/versions/{other}/infer",
        ):
            call = c.post if path.endswith("infer") else c.get
            kw = {"json": infer_body(POS_MODEL, 1)} if path.endswith("infer") else {}
            message = v2_error(await call(path, **kw), 404)
            assert f"not served at version '{other}'" in message and repr(version) in message
        for path in ("/v2/models/nope", "/v2/models/nope/ready", "/v2/models/nope/versions/1"):
            assert "no model named 'nope'" in v2_error(await c.get(path), 404)


async def test_not_ready_is_503_and_alive_still(tmp_path):
    async with live_server(make_settings(tmp_path)) as srv, srv.client() as c:
        assert (await c.get("/v2/health/live")).json() == {"live": True}
        assert "holds no models" in v2_error(await c.get("/v2/health/ready"), 503)
        assert (await c.get("/readyz")).status_code == 503  # the same truth
        v2_error(await c.get("/v2/models/pos-en/ready"), 404)


# ------------------------------------------------------------------ errors
def v2_error(r: httpx.Response, status: int) -> str:
    """The message of a V2 error answer (the protocol's shape, never /v1's)."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers["x-request-id"]
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    return body["error"]


def _pol(*inputs: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"inputs": list(inputs), **more}


BAD = [
    # a V2 envelope the model cannot take: 400
    (POLARITY_MODEL, b'{"inputs": [', 400, "not valid JSON"),
    (POLARITY_MODEL, b"", 400, "JSON object body is required"),
    (POLARITY_MODEL, {"inputs": "x"}, 400, "inputs: Input should be a valid list"),
    (POLARITY_MODEL, {"input": []}, 400, "unknown field"),
    (POLARITY_MODEL, _pol(texts("text", ["a"]) | {"shape": [-1]}), 400, "shape[0]: Input"),
    (POLARITY_MODEL, _pol(texts("text", ["a"]) | {"shape": ["1"]}), 400, "valid integer"),
    (
        POLARITY_MODEL,
        _pol({"name": "text", "shape": [2], "datatype": "FP32", "data": [1, 2]}),
        400,
        "input 'text' has datatype 'FP32'; text inputs are BYTES",
    ),
    (POLARITY_MODEL, _pol(texts("text", ["a", "b"], [3])), 400, "shape [3] but 2 data elements"),
    # a shape over NLPSERVE_MAX_BATCH_ITEMS (3) that the data do not fill: the mismatch
    (POLARITY_MODEL, _pol(texts("text", ["a", "b"], [5])), 400, "shape [5] but 2 data elements"),
    (POLARITY_MODEL, _pol(texts("text", ["a", "b"], [2, 1])), 400, "shape [2, 1]; text inputs"),
    (POLARITY_MODEL, _pol(texts("text", ["a", 5])), 400, "element 1 is a number, not a string"),
    (POLARITY_MODEL, _pol(texts("text", ["a", None])), 400, "element 1 is null"),
    (POLARITY_MODEL, _pol(texts("txt", ["a"])), 400, "unknown input 'txt'; polarity-en takes"),
    (POLARITY_MODEL, _pol(), 400, "missing input 'text'"),
    (POLARITY_MODEL, _pol(texts("text", ["a"]), texts("text", ["b"])), 400, "given twice"),
    (QA_MODEL, _pol(texts("question", ["q"])), 400, "missing input 'context'; qa-zh takes"),
    (
        QA_MODEL,
        _pol(texts("question", ["q"]), texts("context", ["a", "b"])),
        400,
        "shapes [1] and [2]; they must hold the same number of texts",
    ),
    (
        POLARITY_MODEL,
        _pol(texts("text", ["a"]), outputs=[{"name": "x"}]),
        400,
        "unknown output 'x'",
    ),
    (
        POLARITY_MODEL,
        _pol(texts("text", ["a"]), outputs=[{"name": "label"}, {"name": "label"}]),
        400,
        "requested twice",
    ),
    (
        POLARITY_MODEL,
        _pol(
            texts("text", ["a"]), outputs=[{"name": "label", "parameters": {"classification": 1}}]
        ),
        400,
        "classification extension is not supported",
    ),
    (
        POLARITY_MODEL,
        _pol(texts("text", ["a"]) | {"parameters": {"binary_data_size": 5}}),
        400,
        "binary tensor data",
    ),
    # what /v1 answers 422 for the same cause: 422
    (POLARITY_MODEL, _pol(texts("text", [])), 422, "input 'text' holds no text (shape [0])"),
    (POLARITY_MODEL, _pol(texts("text", ["a", " \t"])), 422, "text[1]: must contain some visible"),
    (
        POLARITY_MODEL,
        b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["\\ud800"]}]}',
        422,
        "text[0]: contains an unpaired",
    ),
    (POLARITY_MODEL, _pol(texts("text", ["a"] * 4)), 422, "4 texts (shape [4]) in one request"),
    (POLARITY_MODEL, _pol(texts("text", ["a", "b" * 301])), 422, "text[1] has 301 characters"),
    (POS_MODEL, _pol(texts("text", ["a", "a " * 65])), 422, "text[1]: the text has more than 64"),
    # an id that is not Unicode (a lone surrogate) cannot be echoed back: refused, not a 500
    (
        POLARITY_MODEL,
        b'{"id": "\\ud800", "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", '
        b'"data": ["a"]}]}',
        400,
        "id: contains an unpaired surrogate",
    ),
    # unknown model: 404
    ("nope", _pol(texts("text", ["a"])), 404, "no model named 'nope' is loaded"),
]


@pytest.mark.parametrize("model, body, status, message", BAD)
async def test_bad_requests_get_the_protocols_error_with_v1s_status(
    lc, model, body, status, message
):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = await lc.post(f"/v2/models/{model}/infer", **kw)
    assert message in v2_error(r, status)


@pytest.mark.parametrize(
    "v2, v1",
    [
        (_pol(texts("text", [" "])), {"text": " "}),
        (_pol(texts("text", ["b" * 301])), {"text": "b" * 301}),
        (_pol(texts("text", ["a"] * 4)), {"inputs": [{"text": "a"}] * 4}),
        (_pol(texts("text", [])), {"inputs": []}),
        (b"{", b"{"),
    ],
)
async def test_a_cause_v1_also_has_gets_v1s_status(lc, v2, v1):
    def kw(body):
        return {"content": body} if isinstance(body, bytes) else {"json": body}

    r2 = await lc.post(f"/v2/models/{POLARITY_MODEL}/infer", **kw(v2))
    r1 = await lc.post("/v1/polarity", **kw(v1))
    assert r2.status_code == r1.status_code and r1.status_code in (400, 422)
    v2_error(r2, r1.status_code)


async def test_binary_tensor_data_is_refused_in_words(lc):
    """tritonclient's default input encoding: a JSON head, then raw bytes (here a 4-byte
    length and the text), with the head's length in a header: not JSON, refused so."""
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "text",
                    "shape": [1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": 10},
                }
            ]
        }
    ).encode()
    body = head + (6).to_bytes(4, "little") + b"a film"
    headers = {
        "Inference-Header-Content-Length": str(len(head)),
        "Content-Type": "application/octet-stream",
    }
    r = await lc.post(f"/v2/models/{POLARITY_MODEL}/infer", content=body, headers=headers)
    assert "set_data_from_numpy(array, binary_data=False)" in v2_error(r, 400)


async def test_body_over_the_size_limit_is_413_in_the_v2_shape(lc):
    body = _pol(texts("text", ["a" * 5000]))
    assert "NLPSERVE_MAX_BODY_BYTES" in v2_error(
        await lc.post(f"/v2/models/{POLARITY_MODEL}/infer", json=body), 413
    )


@pytest.mark.parametrize("value", ["0", "soon"])
async def test_bad_deadline_header_is_400(lc, value):
    r = await lc.post(
        f"/v2/models/{POLARITY_MODEL}/infer",
        json=infer_body(POLARITY_MODEL, 1),
        headers={"X-Deadline-Ms": value},
    )
    assert "X-Deadline-Ms must be a positive number" in v2_error(r, 400)


async def test_unknown_path_and_method(lc):
    assert "no endpoint GET /v2/models/x/nothing" in v2_error(
        await lc.get("/v2/models/x/nothing"), 404
    )
    assert "POST is not allowed" in v2_error(await lc.post("/v2/health/ready"), 405)


# ------------------------------------------------------------------ queue, deadline, disconnect
async def test_queue_full_is_429_with_retry_after(limited, lc):
    q = limited.queue
    q.pause()
    held = [
        asyncio.create_task(lc.post("/v1/polarity", json={"text": t}))
        for t in ("good film", "bad film", "fine film")
    ]
    await wait_for(lambda: q.depth(POLARITY_MODEL) == 3)
    r = await lc.post(f"/v2/models/{POLARITY_MODEL}/infer", json=infer_body(POLARITY_MODEL, 1))
    assert "retry later" in v2_error(r, 429)
    assert int(r.headers["retry-after"]) >= 1
    q.resume()
    assert [(await t).status_code for t in held] == [200, 200, 200]


async def test_deadline_exceeded_is_504_and_the_item_never_runs(limited, lc):
    q = limited.queue
    q.pause()
    ran_before = len(q.batch_log)
    r = await lc.post(
        f"/v2/models/{POLARITY_MODEL}/infer",
        json=infer_body(POLARITY_MODEL, 1),
        headers={"X-Deadline-Ms": "50"},
    )
    assert "not served before the request deadline" in v2_error(r, 504)
    assert q.waiting == 0
    q.resume()
    await wait_for(lambda: q.depth(POLARITY_MODEL) == 0)
    assert len(q.batch_log) == ran_before


async def test_client_that_goes_away_is_not_run(limited, lc):
    q = limited.queue
    q.pause()
    ran_before = len(q.batch_log)
    before = await read_metrics(lc)
    body = json.dumps(infer_body(POLARITY_MODEL, 1)).encode()
    request = (
        f"POST /v2/models/{POLARITY_MODEL}/infer HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    reader, writer = await asyncio.open_connection("127.0.0.1", limited.port)
    writer.write(request)
    await writer.drain()
    await wait_for(lambda: q.depth(POLARITY_MODEL) == 1)
    writer.transport.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
    )
    writer.close()
    await wait_for(lambda: q.waiting == 0)  # the handler saw the disconnect and withdrew
    q.resume()
    await wait_for(lambda: q.depth(POLARITY_MODEL) == 0)
    assert len(q.batch_log) == ran_before
    reason = dict(model=POLARITY_MODEL, reason="client_closed_request")
    after = await read_metrics(lc)
    assert metric_value(after, "nlpserve_rejected_total", **reason) == (
        metric_value(before, "nlpserve_rejected_total", **reason) + 1
    )


# ------------------------------------------------------------------ generated bodies
_SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    # st.text() never draws a lone surrogate: one, sent as a \\ud800 escape
    st.sampled_from(["a film", "\u200b", " ", "x" * 301, "a " * 65, "a\ud800"]),
)
# what /v1 refuses too (422): nothing visible, over NLPSERVE_MAX_TEXT_CHARS, too many words
_REFUSED_TEXTS = ["\u200b", " ", "x" * 301, "a " * 65]
_DATA = st.recursive(_SCALAR, lambda inner: st.lists(inner, max_size=4), max_leaves=8)
_PARAMETERS = st.dictionaries(
    st.sampled_from(["binary_data_size", "binary_data", "classification", "content_type"]),
    _SCALAR,
    max_size=2,
)
_TENSOR = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["text", "question", "context", "txt"]),
        "shape": st.lists(st.integers(min_value=-1, max_value=4), max_size=3),
        "datatype": st.sampled_from(["BYTES", "BYTES", "FP32", "bytes"]),
        "data": st.lists(_DATA, max_size=5),
    },
    optional={"parameters": _PARAMETERS},
)
_BODY = st.fixed_dictionaries(
    {"inputs": st.lists(_TENSOR, max_size=3)},
    optional={
        "id": st.one_of(st.text(max_size=5), st.just("\udc00"), st.integers()),
        "parameters": _PARAMETERS,
        "outputs": st.lists(
            st.fixed_dictionaries(
                {"name": st.sampled_from(["label", "probabilities", "tags", "answer", "x"])},
                optional={"parameters": _PARAMETERS},
            ),
            max_size=3,
        ),
    },
)


_OUTPUT_NAMES = {
    DETECT_MODEL: ["label", "probability", "probabilities", "truncated"],
    POLARITY_MODEL: ["label", "probability", "probabilities", "truncated"],
    POS_MODEL: ["tokens", "tags"],
    QA_MODEL: ["answer", "score", "start", "end"],
}


@st.composite
def _request(draw: Any) -> tuple[str, dict[str, Any]]:
    """A model and a body: half of any V2 shape, half what the model takes (texts of any
    characters, flat or nested, some outputs of its own) so that many are answered."""
    model = draw(st.sampled_from(MODELS))
    if draw(st.booleans()):
        return model, draw(_BODY)
    n = draw(st.integers(min_value=1, max_value=3))
    inputs = []
    for name in ("question", "context") if model == QA_MODEL else ("text",):
        text = st.one_of(st.text(min_size=1, max_size=12), st.sampled_from(_REFUSED_TEXTS))
        data = draw(st.lists(text, min_size=n, max_size=n))
        inputs.append(texts(name, [data] if draw(st.booleans()) else data, [n]))
    body: dict[str, Any] = {"inputs": inputs}
    if draw(st.booleans()):
        names = draw(st.lists(st.sampled_from(_OUTPUT_NAMES[model]), unique=True, max_size=3))
        body["outputs"] = [{"name": name} for name in names]
    if draw(st.booleans()):
        body["id"] = draw(st.one_of(st.text(max_size=5), st.just("\udc00")))  # echoed back
    return model, body


def _generated(url: str) -> dict[int, int]:
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=url, timeout=30) as c:

        @hsettings(
            max_examples=120,
            derandomize=True,
            database=None,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(request=_request())
        def run(request: tuple[str, dict[str, Any]]) -> None:
            model, body = request
            r = c.post(f"/v2/models/{model}/infer", content=json.dumps(body).encode())
            what = f"{model} {json.dumps(body)[:400]} -> {r.status_code} {r.text[:300]}"
            assert r.status_code in (200, 400, 413, 422), what
            if r.status_code == 200:
                for out in r.json()["outputs"]:
                    assert len(out["data"]) == math.prod(out["shape"]), what
            else:
                v2_error(r, r.status_code)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

        run()
    return statuses


async def test_generated_bodies_are_answered_or_refused_never_a_500(limited):
    """Bodies of any V2 shape (names, shapes, datatypes, nested data of any JSON value,
    parameters) to every model: a 200 with consistent tensors, or a 4xx in the V2 shape."""
    statuses = await asyncio.to_thread(_generated, limited.url)
    assert sum(statuses.values()) == 120
    assert min(statuses.get(200, 0), statuses.get(400, 0), statuses.get(422, 0)) >= 10, statuses

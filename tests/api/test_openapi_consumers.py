"""``/openapi.json`` as its consumers use it: clients generated from it (openapi-python-client,
openapi-generator, orval) and people trying requests in ``/docs``.

test_openapi_fuzz.py checks that the answers match the schema; this checks that the schema
is good to generate from and to read: readable, stable operation names (the generated
functions' names: ``answer_question``, not ``qa_v1_qa_post``), named request and result
types (not FastAPI's ``Body`` and ``Response Qa V1 Qa Post``), every error a client may get
declared with its schema and headers, and request examples that this server answers 200.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from service.api.app import create_app
from service.api.routes.explain import warm_up_explain
from service.api.schemas import ReadyResponse
from service.explain.engine import shap_available
from tests.service_support import (
    DETECT_MODEL,
    POLARITY_MODEL,
    POS_MODEL,
    QA_MODEL,
    live_server,
    make_settings,
    require_model,
)

live = pytest.mark.asyncio(loop_scope="session")  # the tests that start servers

# The names clients are generated with: changing one breaks their code (a renamed function),
# so they change only on purpose, here and in docs/service.md.
OPERATION_IDS = {
    ("POST", "/v1/qa"): "answer_question",
    ("POST", "/v1/detect"): "detect",
    ("POST", "/v1/pos"): "tag_parts_of_speech",
    ("POST", "/v1/polarity"): "classify_polarity",
    ("POST", "/v1/detect/explain"): "explain_detect",
    ("POST", "/v1/polarity/explain"): "explain_polarity",
    ("GET", "/v1/models"): "list_models",
    ("GET", "/v1/models/{name}"): "get_model",
    ("GET", "/healthz"): "check_liveness",
    ("GET", "/readyz"): "check_readiness",
    ("GET", "/metrics"): "get_metrics",
    ("GET", "/v2"): "v2_server_metadata",
    ("GET", "/v2/health/live"): "v2_server_live",
    ("GET", "/v2/health/ready"): "v2_server_ready",
    ("GET", "/v2/models/{name}"): "v2_model_metadata",
    ("GET", "/v2/models/{name}/versions/{version}"): "v2_model_version_metadata",
    ("GET", "/v2/models/{name}/ready"): "v2_model_ready",
    ("GET", "/v2/models/{name}/versions/{version}/ready"): "v2_model_version_ready",
    ("POST", "/v2/models/{name}/infer"): "v2_infer",
    ("POST", "/v2/models/{name}/versions/{version}/infer"): "v2_infer_version",
}
# Every POST may answer these (body, header, model, queue and deadline errors, a bug).
POST_ERRORS = {"400", "404", "408", "413", "415", "422", "429", "500", "503", "504"}
ERROR_REF = "#/components/schemas/ErrorResponse"
V2_ERROR_REF = "#/components/schemas/V2ErrorResponse"  # the V2 protocol's {"error": "..."}
TASKS = {"/v1/pos": "Pos", "/v1/polarity": "Polarity", "/v1/detect": "Detect", "/v1/qa": "QA"}


def _spec(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """The app's schema (no server needed: it is built from the routes and the settings)."""
    return create_app(make_settings(tmp_path, **overrides)).openapi()


def _operations(spec: dict[str, Any]):
    for path, item in spec["paths"].items():
        for method, op in item.items():
            yield method.upper(), path, op


def test_operation_ids_are_the_chosen_readable_names(tmp_path):
    spec = _spec(tmp_path)
    ids = {(method, path): op.get("operationId") for method, path, op in _operations(spec)}
    assert ids == OPERATION_IDS
    assert len(set(ids.values())) == len(ids)
    tags = {method + " " + path: op.get("tags") for method, path, op in _operations(spec)}
    assert all(t and len(t) == 1 for t in tags.values()), tags  # one module per tag
    assert {t["name"] for t in spec["tags"]} == {t[0] for t in tags.values()}
    assert all(t["description"] for t in spec["tags"])


def test_every_operation_declares_its_errors_and_headers(tmp_path):
    """A generated client parses what is declared (openapi-python-client: an undeclared
    status is `None`, or UnexpectedStatus); /docs lists it."""
    spec = _spec(tmp_path)
    for method, path, op in _operations(spec):
        responses = op["responses"]
        assert "500" in responses, (method, path)
        if method == "POST":
            assert set(responses) >= POST_ERRORS, (path, sorted(responses))
        for status, response in responses.items():
            where = (method, path, status)
            assert response["description"], where
            if int(status) >= 400:
                ref = V2_ERROR_REF if path.startswith("/v2") else ERROR_REF
                assert response["content"]["application/json"]["schema"] == {"$ref": ref}
            rid = response["headers"]["X-Request-ID"]
            assert rid["required"] and rid["description"], where
            if status in ("429", "503"):
                retry = response["headers"]["Retry-After"]
                assert retry["schema"]["type"] == "integer" and retry["description"], where
                assert retry.get("required", False) == (status == "429"), where
        for param in op.get("parameters", []):
            # generators document an argument from its schema's description
            assert param["description"] and param["schema"].get("description"), (path, param)
    error = spec["components"]["schemas"]["ErrorBody"]["properties"]
    assert error["code"]["description"] and error["message"]["description"]
    v2_error = spec["components"]["schemas"]["V2ErrorResponse"]
    assert v2_error["properties"]["error"]["type"] == "string" and v2_error["required"] == ["error"]


def test_bodies_and_results_are_named_types(tmp_path):
    """Generated types are named after the schema's components, or after inline titles
    (FastAPI's: `Body` for every prediction body, `Response Qa V1 Qa Post`)."""
    spec = _spec(tmp_path)
    schemas = spec["components"]["schemas"]
    for method, path, op in _operations(spec):
        bodies = [c["schema"] for c in op.get("requestBody", {}).get("content", {}).values()]
        results = [
            c["schema"]
            for status, r in op["responses"].items()
            for media, c in r.get("content", {}).items()
            if media == "application/json"
        ]
        for schema in bodies + results:
            assert set(schema) == {"$ref"}, (method, path, schema)
    for name, schema in schemas.items():
        assert not schema.get("title", "").startswith(("Body", "Response ")), name
    assert not [n for n in schemas if n.startswith(("Body_", "Response_")) or "_v1_" in n]
    for path, task in TASKS.items():
        op = spec["paths"][path]["post"]
        body = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert body == f"#/components/schemas/{task}Body"
        assert schemas[f"{task}Body"]["oneOf"] == [
            {"$ref": f"#/components/schemas/{task}Request"},
            {"$ref": f"#/components/schemas/{task}BatchRequest"},
        ]
        result = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
        assert result == f"#/components/schemas/{task}Result"
        assert {r["$ref"].rsplit("/", 1)[1] for r in schemas[f"{task}Result"]["anyOf"]} == {
            f"{task}Response",
            f"{task}BatchResponse",
        }
    for path, name in (("/healthz", "HealthResponse"), ("/readyz", "ReadyResponse")):
        content = spec["paths"][path]["get"]["responses"]["200"]["content"]
        assert content["application/json"]["schema"] == {"$ref": f"#/components/schemas/{name}"}
    for name in ("ModelInfo", "ReadyResponse", "QAResponse", "ExplainResponse"):
        props = schemas[name]["properties"]
        assert all(p.get("description") for p in props.values()), name


def _examples(spec: dict[str, Any]):
    for _, path, op in _operations(spec):
        if "requestBody" in op:
            examples = op["requestBody"]["content"]["application/json"].get("examples", {})
            assert examples, path  # "Try it out" starts from one
            for name, example in examples.items():
                yield path, name, example["value"]


def _url(path: str, example: str) -> str:
    """Where an example is sent: a V2 inference's example is named after its model (the
    path's ``{name}``), at the served version."""
    return path.format(name=example, version="1")


async def _answers_every_example(c: httpx.AsyncClient, app: FastAPI) -> dict[str, dict[str, Any]]:
    # shap's start-up first, untimed: the process's first can outlast an explanation's 20 s
    # deadline on a busy machine (this file alone, or run first)
    await warm_up_explain(app)
    spec = (await c.get("/openapi.json")).json()
    sent = {}
    for path, name, value in _examples(spec):
        if path.endswith("/explain") and not shap_available():
            continue
        r = await c.post(_url(path, name), json=value)
        assert r.status_code == 200, (path, name, r.text)
        if path.startswith("/v1") and "inputs" in value:
            assert len(r.json()["outputs"]) == len(value["inputs"]), (path, name)
        sent[f"{path} {name}"] = value
    return sent


@pytest.fixture
def _all_models(model_repo):
    for name in (DETECT_MODEL, POLARITY_MODEL, POS_MODEL, QA_MODEL):
        require_model(model_repo, name)


@live
async def test_every_request_example_is_answered(client, service, _all_models):
    sent = await _answers_every_example(client, service.app)
    for path in TASKS:
        assert {f"{path} single", f"{path} batch"} <= set(sent), sorted(sent)
    for model in (DETECT_MODEL, POLARITY_MODEL, POS_MODEL, QA_MODEL):
        assert f"/v2/models/{{name}}/infer {model}" in sent, sorted(sent)
    r = await client.get("/readyz")
    ReadyResponse.model_validate(r.json())  # what the schema says /readyz answers


@live
async def test_examples_fit_this_servers_limits(model_repo, _all_models):
    """A server with small limits publishes examples it answers 200, not 422: batches of
    at most NLPSERVE_MAX_BATCH_ITEMS, max_evals within its limit, no text over its
    NLPSERVE_MAX_TEXT_CHARS (the detector's examples are ~270 characters)."""
    limits = dict(
        max_text_chars=200,
        max_batch_items=1,
        explain_max_evals_limit=24,
        explain_max_evals_default=12,
    )
    async with live_server(make_settings(model_repo, **limits)) as srv, srv.client() as c:
        sent = await _answers_every_example(c, srv.app)
        assert "/v1/detect single" not in sent and "/v1/qa batch" in sent
        assert all(len(v.get("inputs", [])) <= 1 for k, v in sent.items() if k.startswith("/v1"))
        # V2 examples hold one text per tensor: each fits any NLPSERVE_MAX_BATCH_ITEMS
        assert "/v2/models/{name}/infer qa-zh" in sent
        assert "/v2/models/{name}/infer detector-en" not in sent  # its text is over 200
        assert len(sent["/v1/detect batch"]["inputs"][0]["text"]) <= 200  # the one that fits
        assert sent["/v1/polarity/explain default"]["max_evals"] == 24
    # the routes' own examples are untouched: an app with the default limits has them whole
    spec = _spec(model_repo)
    full = {f"{p} {n}": v for p, n, v in _examples(spec)}
    assert len(full["/v1/qa batch"]["inputs"]) == 2 and "/v1/detect single" in full


@live
async def test_batches_fit_a_queue_depth_below_the_batch_item_limit(model_repo, _all_models):
    """NLPSERVE_MAX_QUEUE_DEPTH=1 with the default 64 batch items: a request of two items
    needs two sequences, more than the queue holds, and is a 422 input_too_long. The schema
    announced 64 items and its batch examples (two items each) got that 422."""
    settings = make_settings(model_repo, max_queue_depth=1)
    async with live_server(settings) as srv, srv.client() as c:
        sent = await _answers_every_example(c, srv.app)
        spec = (await c.get("/openapi.json")).json()
    assert "/v1/qa batch" in sent
    assert all(len(v.get("inputs", [])) <= 1 for k, v in sent.items() if k.startswith("/v1"))
    schemas = spec["components"]["schemas"]
    assert schemas["PolarityBatchRequest"]["properties"]["inputs"]["maxItems"] == 1


def test_no_example_fits_then_none_is_declared(tmp_path):
    """Limits that every example is over (a 1-character text limit): the request bodies
    declare no examples, not an empty ``examples`` map (an empty choice in /docs)."""
    spec = _spec(tmp_path, max_text_chars=1)
    bodies = [op["requestBody"] for _, _, op in _operations(spec) if "requestBody" in op]
    assert bodies
    for body in bodies:
        for content in body["content"].values():
            assert "examples" not in content, content.get("examples")


# ---------------------------------------------------------------------- a generated client
GENERATOR = shutil.which("openapi-python-client")

_USE_CLIENT = """
import sys
sys.path.insert(0, sys.argv[1])
from nlpserve_client import Client
from nlpserve_client.api.operations import check_readiness, get_model
from nlpserve_client.api.predict import answer_question, classify_polarity
from nlpserve_client.api.v2 import v2_infer, v2_model_metadata
from nlpserve_client.models import (
    ErrorResponse, PolarityBatchRequest, PolarityBatchResponse, PolarityRequest, QARequest,
    QAResponse, ReadyResponse, V2ErrorResponse, V2InferenceRequest, V2InferenceResponse,
    V2ModelMetadata, V2RequestInput, V2RequestOutput,
)

c = Client(base_url=sys.argv[2], raise_on_unexpected_status=True)
q = QARequest(question="中国的首都是哪里？", context="中国的首都是北京。")
a = answer_question.sync(client=c, body=q)
assert isinstance(a, QAResponse) and q.context[a.start:a.end] == a.answer, a
assert isinstance(a.score, float)
b = classify_polarity.sync(client=c, body=PolarityBatchRequest(
    inputs=[PolarityRequest(text="great fun"), PolarityRequest(text="dull")]))
assert isinstance(b, PolarityBatchResponse) and len(b.outputs) == 2, b
assert all(isinstance(o.positive_probability, float) for o in b.outputs)
e = classify_polarity.sync_detailed(client=c, body=PolarityRequest(text=" "))
assert e.status_code == 422 and isinstance(e.parsed, ErrorResponse), e
assert e.parsed.error.code == "empty_text" and e.headers["X-Request-ID"]
e = classify_polarity.sync_detailed(client=c, body=PolarityRequest(text="x"), x_deadline_ms="0")
assert e.status_code == 400 and e.parsed.error.code == "invalid_header", e
m = get_model.sync(client=c, name="nope")
assert isinstance(m, ErrorResponse) and m.error.code == "model_not_found", m
assert isinstance(check_readiness.sync(client=c), ReadyResponse)
body = V2InferenceRequest(
    inputs=[V2RequestInput(name="text", shape=[2], datatype="BYTES", data=["great fun", "dull"])],
    outputs=[V2RequestOutput(name="label")],
)
v = v2_infer.sync(client=c, name="polarity-en", body=body)
assert isinstance(v, V2InferenceResponse) and v.model_name == "polarity-en", v
assert [o.name for o in v.outputs] == ["label"] and len(v.outputs[0].data) == 2, v
body.inputs[0].datatype = "FP32"
e = v2_infer.sync_detailed(client=c, name="polarity-en", body=body)
assert e.status_code == 400 and isinstance(e.parsed, V2ErrorResponse), e
assert "datatype 'FP32'" in e.parsed.error, e.parsed
m = v2_model_metadata.sync(client=c, name="qa-zh")
assert isinstance(m, V2ModelMetadata) and [i.name for i in m.inputs] == ["question", "context"]
print("ok")
"""


@live
@pytest.mark.skipif(GENERATOR is None, reason="openapi-python-client is not installed")
async def test_openapi_python_client_generates_a_working_client(model_repo, tmp_path, _all_models):
    """Generates a client from the served schema (no warnings; the functions and types named
    as chosen) and, with the generator's own Python (it has the client's attrs and httpx),
    calls the server through it: typed results, a batch, errors parsed as ErrorResponse, a
    V2 inference and its error (V2ErrorResponse)."""
    assert GENERATOR is not None  # the skipif above
    async with live_server(make_settings(model_repo)) as srv, srv.client() as c:
        spec_file = tmp_path / "openapi.json"
        spec_file.write_text((await c.get("/openapi.json")).text)
        gen = subprocess.run(
            [GENERATOR, "generate", "--path", str(spec_file), "--output-path", "client"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        out = gen.stdout + gen.stderr
        assert gen.returncode == 0, out
        assert "Warning" not in out.replace("ruff is not in PATH", ""), out
        package = tmp_path / "client" / "nlpserve_client"
        modules = {p.stem for p in (package / "api").rglob("*.py") if p.stem != "__init__"}
        assert modules == set(OPERATION_IDS.values())
        assert {p.parent.name for p in (package / "api").rglob("answer_question.py")} == {"predict"}
        models = {p.stem for p in (package / "models").glob("*.py")}
        assert {"qa_request", "qa_batch_request", "error_response", "ready_response"} <= models
        assert not [m for m in models if "_v1_" in m or "healthz" in m or m.startswith("body")]
        python = Path(GENERATOR).with_name("python")
        if not python.exists():
            pytest.skip(f"no Python beside {GENERATOR} to run the generated client with")
        script = tmp_path / "use_client.py"
        script.write_text(textwrap.dedent(_USE_CLIENT))
        # in a thread: the server answers from this test's event loop
        run = await asyncio.to_thread(
            subprocess.run,
            [str(python), str(script), str(tmp_path / "client"), srv.url],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr


def test_schema_is_stable(tmp_path):
    """Two apps publish the same document: clients regenerate without spurious diffs."""
    assert json.dumps(_spec(tmp_path)) == json.dumps(_spec(tmp_path))

"""GET /v1/models, /healthz, /readyz, /metrics and the OpenAPI page."""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from service.loop_lag import INTERVAL_S
from service.repository import load_manifest
from tests.service_support import (
    LOOP_STALL_S,
    live_server,
    make_settings,
    metric_value,
    read_metrics,
    stall_loop,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_healthz_and_readyz(client, service):
    r = await client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = await client.get("/readyz")
    assert r.status_code == 200
    body = r.json()
    assert {"pos-en", "polarity-en"} <= set(body["models"])
    if service.state.settings.queue == "redis":  # one worker serves every model here
        for _ in range(50):
            body = (await client.get("/readyz")).json()
            if body["model_workers"] == dict.fromkeys(body["models"], 1):
                break
            await asyncio.sleep(0.1)
        assert body["workers"] == 1 and body["model_workers"] == dict.fromkeys(body["models"], 1)
    else:
        assert "workers" not in body and "model_workers" not in body
    for path in ("/healthz", "/readyz", "/"):  # HEAD: what load balancers probe with
        r = await client.head(path)
        assert r.status_code == 200 and not r.content


async def test_models_lists_what_runs_where(client, service, model_repo):
    r = await client.get("/v1/models")
    assert r.status_code == 200
    models = {m["name"]: m for m in r.json()["models"]}
    assert set(models) == set(service.state.tasks)
    settings = service.state.settings
    assert r.json()["explain"] == {
        "max_evals_default": settings.explain_max_evals_default,
        "max_evals_limit": settings.explain_max_evals_limit,
    }
    # each batch body's maxItems in /openapi.json, without its ~200 KB
    most = min(settings.max_batch_items, settings.max_queue_depth)
    assert r.json()["batch"] == {"max_items": most}
    for name, m in models.items():
        manifest = load_manifest(model_repo / name / "1")
        assert m["version"] == "1" and m["task"] == manifest.task
        assert m["buckets"] == manifest.buckets
        assert m["labels"] == manifest.labels
        assert m["metrics"] == manifest.metrics
        # each variant's own measured figures (the README quotes int8's), not only fp32's
        assert m["variant_metrics"] == {
            k: v.metrics for k, v in manifest.variants.items() if v.metrics
        }
        assert m["max_length"] == manifest.max_length
        if service.state.runners:  # in-process: this process runs the model
            assert m["provider"] == "CPUExecutionProvider"
            assert m["fallback"] is False
            assert m["variant"] in m["variants"]
            # what the thread settings resolved to (tests pin 1 ORT thread per batch)
            assert m["batches_at_once"] == service.state.settings.inference_threads_for(
                "CPUExecutionProvider"
            )
            assert m["intra_op_threads"] == 1
        else:
            assert m["batches_at_once"] is None and m["intra_op_threads"] is None
    if service.state.runners and "detector-en" in models:
        # CPU prefers the int8 variant when the repository has one.
        assert models["detector-en"]["variant"] == "int8"
        assert models["pos-en"]["variant"] == "fp32"


async def test_one_model_and_unknown_model(client):
    r = await client.get("/v1/models/pos-en")
    assert r.status_code == 200 and r.json()["task"] == "pos"
    r = await client.get("/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


async def test_metrics_exposition(client):
    await client.post("/v1/polarity", json={"text": "great fun"})
    await client.post("/v1/polarity", json={"text": ""})
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in (
        "nlpserve_requests_total",
        "nlpserve_request_duration_seconds_bucket",
        "nlpserve_queue_depth",
        "nlpserve_rejected_total",
    ):
        assert name in text, name
    assert (
        metric_value(
            text, "nlpserve_requests_total", model="polarity-en", endpoint="predict", status="200"
        )
        >= 1
    )
    assert metric_value(text, "nlpserve_rejected_total", model="polarity-en", reason="empty_text")


async def test_event_loop_lag_shows_a_stalled_loop(client):
    """A handler hogging the loop delays every other request before its handler starts, where
    no request histogram looks: the lag series show it (the server runs on this loop)."""

    async def read() -> str:
        return await read_metrics(client)

    before, after = await stall_loop(read)
    count = "nlpserve_event_loop_lag_seconds_count"
    assert metric_value(after, count) > metric_value(before, count)
    assert metric_value(after, "nlpserve_event_loop_lag_max_seconds") >= LOOP_STALL_S - INTERVAL_S


async def test_event_loop_lag_monitor_stops_with_the_app(tmp_path):
    def monitors() -> set[asyncio.Task[object]]:  # the shared servers' run on this loop too
        return {t for t in asyncio.all_tasks() if t.get_name() == "event-loop-lag"}

    others = monitors()
    async with live_server(make_settings(tmp_path)) as srv, srv.client() as c:
        assert "nlpserve_event_loop_lag_seconds_count" in await read_metrics(c)
        ours = monitors() - others
        assert len(ours) == 1
    # stopped by the lifespan, not left for the loop to destroy while pending
    assert all(t.done() for t in ours) and not monitors() - others


async def test_batch_metrics_in_process(inprocess_service):
    async with inprocess_service.client() as c:
        await c.post("/v1/pos", json={"inputs": [{"text": "a big dog"}, {"text": "the cat"}]})
        text = await read_metrics(c)
    for name in (
        "nlpserve_batch_size_bucket",
        "nlpserve_padding_efficiency_bucket",
        "nlpserve_inference_duration_seconds_bucket",
        "nlpserve_batch_tokens_total",
        "nlpserve_model_info",
    ):
        assert name in text, name
    real = metric_value(text, "nlpserve_batch_tokens_total", model="pos-en", kind="real")
    padded = metric_value(text, "nlpserve_batch_tokens_total", model="pos-en", kind="padded")
    assert 0 < real <= padded
    assert metric_value(
        text, "nlpserve_model_info", model="pos-en", provider="CPUExecutionProvider"
    )


async def test_docs_pages_load_everything_from_this_server(client):
    """/docs and /redoc were blank on offline hosts: FastAPI's pages load Swagger UI and
    ReDoc from a CDN. Every script, style and icon they name must come from here."""
    import re

    for page in ("/docs", "/redoc"):
        r = await client.get(page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']|url: *['"]([^'"]+)['"]""", r.text)
        urls = [a or b for a, b in urls]
        assert urls and not [u for u in urls if "//" in u], urls  # nothing off this host
        for url in urls:
            asset = await client.get(url)
            assert asset.status_code == 200, url
            if url.endswith(".png"):  # fastapi-offline 1.7.0's favicon is 412 bytes
                assert asset.content.startswith(b"\x89PNG"), url
            else:
                assert len(asset.content) > 1000, url
        # our part of their accessibility: the language screen readers read them in
        assert '<html lang="en">' in r.text, page
    r = await client.get("/docs")
    assert "/docs-assets/swagger-ui-bundle.js" in r.text and "'/openapi.json'" in r.text
    assert (await client.get("/docs-assets/../app.py")).status_code == 404
    assert (await client.get("/docs-assets/nope.js")).status_code == 404


async def test_openapi_page_is_usable(client):
    spec = (await client.get("/openapi.json")).json()
    for path in ("/v1/qa", "/v1/detect", "/v1/pos", "/v1/polarity"):
        op = spec["paths"][path]["post"]
        examples = op["requestBody"]["content"]["application/json"]["examples"]
        assert {"single", "batch"} <= set(examples)
        assert "422" in op["responses"] and "429" in op["responses"]
    # Every POST documents the shared errors (explain lacked 400/413) and X-Deadline-Ms as a
    # header Swagger's "Try it out" can send; every 422 is this service's error shape.
    refused = ("1e3", "1.5e+308", "-1", "inf", "0", "0.000")
    for path, item in spec["paths"].items():
        if "post" in item:
            op = item["post"]
            assert {"400", "408", "413", "422", "429", "503", "504"} <= set(op["responses"]), path
            headers = {p["name"]: p for p in op["parameters"] if p["in"] == "header"}
            # digits with an optional fraction ("2.5" is accepted), not any JSON number
            # ("1e3" is not)
            header = headers["X-Deadline-Ms"]["schema"]
            assert header["type"] == "string", path
            assert all(re.fullmatch(header["pattern"], v) for v in ("2000", "2.5", "2.")), path
            assert not any(re.fullmatch(header["pattern"], v) for v in refused), path
            if path.endswith("/explain"):
                assert "501" in op["responses"]
    assert "HTTPValidationError" not in json.dumps(spec)
    for name in ("PosResponse", "PolarityResponse", "DetectResponse", "QAResponse"):
        assert spec["components"]["schemas"][name]["examples"], name
    polarity = spec["paths"]["/v1/polarity/explain"]["post"]["requestBody"]["content"]
    text = next(iter(polarity["application/json"]["examples"].values()))["value"]["text"]
    assert "sky" not in text  # was the detector's example
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    for path in ("/healthz", "/readyz", "/v1/models", "/v1/models/{name}"):
        assert spec["paths"][path]["get"]["description"], path
    # a name in the path cannot fail validation: no 422 documented that cannot happen (500,
    # a bug, is declared on every operation: tests/api/test_openapi_consumers.py)
    responses = spec["paths"]["/v1/models/{name}"]["get"]["responses"]
    assert set(responses) == {"200", "404", "500"}
    props = spec["components"]["schemas"]["QARequest"]["properties"]
    assert props["context"]["description"] and props["question"]["examples"]
    assert spec["components"]["schemas"]["ErrorResponse"]


async def test_bucket_override_from_settings(model_repo):
    settings = make_settings(model_repo, buckets={"pos-en": [4, 12, 500]})
    async with live_server(settings) as srv, srv.client() as c:
        pos = (await c.get("/v1/models/pos-en")).json()
        assert pos["buckets"] == [4, 12, 64]  # past max_length dropped; max_length last
        pol = (await c.get("/v1/models/polarity-en")).json()
        assert pol["buckets"] == load_manifest(model_repo / "polarity-en" / "1").buckets


async def test_empty_repository_is_alive_but_not_ready(tmp_path):
    async with live_server(make_settings(tmp_path)) as srv, srv.client() as c:
        assert (await c.get("/healthz")).status_code == 200
        r = await c.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_models"
        r = await c.post("/v1/pos", json={"text": "a"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_loaded"


async def test_request_id_is_echoed_or_minted(client):
    r = await client.post(
        "/v1/polarity", json={"text": "fine"}, headers={"X-Request-ID": "ab-12.3"}
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "ab-12.3"
    # errors carry it too, and a malformed id is replaced rather than echoed
    r = await client.post("/v1/polarity", json={}, headers={"X-Request-ID": "bad id\twith tab"})
    assert r.status_code == 422
    minted = r.headers["x-request-id"]
    assert minted != "bad id\twith tab" and len(minted) == 32 and int(minted, 16) >= 0
    a = (await client.get("/healthz")).headers["x-request-id"]
    b = (await client.get("/healthz")).headers["x-request-id"]
    assert a != b

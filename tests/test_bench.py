"""The benchmark's own machinery (never its timings): request generation, the lean HTTP
client, metric deltas, raw-ORT batching, the gateway template renderer, and the rebuild of
the PyTorch baseline from the served ONNX file."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from bench import procs
from bench.fastclient import FastClient, TransportError
from bench.loadgen import (
    LengthDist,
    RequestSpec,
    RetryPolicy,
    build_requests,
    metrics_delta,
    run_load,
    summarize,
)
from bench.raw_ort import sorted_batches
from service.batching import WorkItem


def test_lengths_are_lognormal_and_clipped() -> None:
    d = LengthDist(median=40, sigma=0.8, lo=5, hi=64)
    x = d.sample(5000, np.random.default_rng(0))
    assert x.min() >= 5 and x.max() <= 64
    assert 34 <= np.median(x) <= 46
    assert (x == 64).mean() > 0.1  # the clipped tail piles up at the model's max


def test_requests_are_reproducible_and_sized() -> None:
    a = build_requests("polarity-en", 50, seed=3)
    b = build_requests("polarity-en", 50, seed=3)
    assert [s.payload for s in a] == [s.payload for s in b]
    assert all(s.path == "/v1/polarity" for s in a)
    assert all(len(s.payload["text"].split()) == s.tokens for s in a)  # word-level models
    qa = build_requests("qa-zh", 5, seed=1)
    assert all({"question", "context"} <= set(s.payload) for s in qa)


def test_retry_policy_honours_retry_after() -> None:
    p = RetryPolicy(retries=2, backoff_s=0.1, max_backoff_s=1.0)
    assert p.delay(0, "2") == 2.0
    assert 0.05 <= p.delay(0, None) <= 0.15
    assert p.delay(10, None) <= 1.5


def test_metrics_delta_is_traffic_weighted() -> None:
    def sample(name: str, v: float, **labels: str) -> tuple[tuple[str, tuple], float]:
        return (name, tuple(sorted({"model": "m", **labels}.items()))), v

    tokens = "nlpserve_batch_tokens_total"
    before = dict([sample(tokens, 100, kind="real"), sample(tokens, 200, kind="padded")])
    after = dict(
        [
            sample(tokens, 1000, kind="real"),
            sample(tokens, 1200, kind="padded"),
            sample("nlpserve_batch_size_count", 10),
            sample("nlpserve_batch_size_sum", 80),
        ]
    )
    d = metrics_delta(before, after, "m")
    assert d["padding_efficiency"] == pytest.approx(900 / 1000)
    assert d["mean_batch_size"] == pytest.approx(8.0)


def test_sorted_batches_respect_both_limits() -> None:
    rng = np.random.default_rng(1)
    items = [
        WorkItem("m", 0, int(n), {}, deadline=0.0, id=str(i))
        for i, n in enumerate(rng.integers(1, 200, size=500))
    ]
    batches = sorted_batches(items, max_size=32, max_tokens=2048)
    assert sorted(it.id for b in batches for it in b) == sorted(it.id for it in items)
    for b in batches:
        assert len(b) <= 32
        assert len(b) * max(it.length for it in b) <= 2048 or len(b) == 1


async def _serve_http(handler_bodies: list[bytes]) -> tuple[asyncio.Server, int]:
    """A raw HTTP/1.1 server answering each request with the next canned response."""
    responses = iter(handler_bodies)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            length = 0
            for line in head.decode().split("\r\n"):
                if line.lower().startswith("content-length:"):
                    length = int(line.split(":")[1])
            await reader.readexactly(length)
            resp = next(responses, None)
            if resp is None:  # simulate a replica dying mid-request
                writer.close()
                return
            writer.write(resp)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_fast_client_lengths_chunks_and_errors() -> None:
    async def scenario() -> None:
        canned = [
            b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nContent-Type: application/json\r\n"
            b'\r\n{"a": true}',
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'4\r\n{"b"\r\n3\r\n: 1\r\n1\r\n}\r\n0\r\n\r\n',
            b"HTTP/1.1 429 Too Many\r\nRetry-After: 0\r\nContent-Length: 2\r\n\r\n{}",
        ]
        server, port = await _serve_http(canned)
        async with server, FastClient(f"http://127.0.0.1:{port}", max_connections=1) as c:
            r1 = await c.post("/x", b'{"q": 1}')
            assert (r1.status, json.loads(r1.content)) == (200, {"a": True})
            r2 = await c.post("/x", b"{}")  # same keep-alive connection
            assert (r2.status, json.loads(r2.content)) == (200, {"b": 1})
            r3 = await c.post("/x", b"{}")
            assert r3.status == 429 and r3.headers["retry-after"] == "0"
            with pytest.raises(TransportError):
                await c.post("/x", b"{}")  # the server closes without answering
        with pytest.raises(TransportError):  # nothing listens any more
            await FastClient(f"http://127.0.0.1:{port}", timeout_s=2).post("/x", b"{}")

    asyncio.run(scenario())


def test_run_load_retries_once_and_summarizes() -> None:
    async def scenario() -> None:
        ok = b'HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n{"v": 1}'
        busy = b"HTTP/1.1 503 Busy\r\nRetry-After: 0\r\nContent-Length: 2\r\n\r\n{}"
        server, port = await _serve_http([ok, busy, ok, ok])
        specs = [RequestSpec(i, "/v1/x", {"text": str(i)}, 3) for i in range(3)]
        async with server:
            results, wall = await run_load(
                f"http://127.0.0.1:{port}", specs, concurrency=1, policy=RetryPolicy(retries=1)
            )
        assert [r.status for r in results] == [200, 200, 200]
        assert [r.attempts for r in results] == [1, 2, 1]
        s = summarize("x", results, wall, specs)
        assert s["ok"] == 3 and s["retried"] == 1 and s["errors"] == {}

    asyncio.run(scenario())


def test_template_rendering_keeps_nginx_variables() -> None:
    text = "listen ${NLPSERVE_GATEWAY_PORT}; set $x $request_id; $NLPSERVE_RATE_LIMIT"
    out = procs.render_template(text, {"NLPSERVE_GATEWAY_PORT": "81", "NLPSERVE_RATE_LIMIT": "5"})
    assert out == "listen 81; set $x $request_id; 5"
    with pytest.raises(KeyError):
        procs.render_template(text, {"NLPSERVE_GATEWAY_PORT": "81"})


def test_baseline_weights_rebuilt_from_onnx_match(model_repo: Path, tmp_path: Path) -> None:
    """bench/onnx_to_torch.py: the PyTorch model read back out of the served ONNX file gives
    ONNX Runtime's logits (it raises otherwise); check it once more on real tokenized text."""
    pytest.importorskip("torch")
    from tests.service_support import DETECT_MODEL, require_model

    require_model(model_repo, DETECT_MODEL)
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForSequenceClassification

    from bench.onnx_to_torch import hf_from_onnx
    from service.preprocess.classify import ClassifyEncoder

    version = model_repo / DETECT_MODEL / "1"
    hf, kind = hf_from_onnx(version, tmp_path / "hf")
    assert kind == "fp32"
    model = AutoModelForSequenceClassification.from_pretrained(str(hf)).eval()
    manifest = json.loads((version / "manifest.json").read_text())
    enc = ClassifyEncoder.load(version / "tokenizer.json", manifest["max_length"])
    feeds = enc(["a short one", "a somewhat longer text that needs more word pieces"])
    want = ort.InferenceSession(str(version / "model.onnx")).run(None, feeds)[0]
    with torch.inference_mode():
        got = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)

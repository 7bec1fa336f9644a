"""The Python client (service/client/) against Redis mode: an API replica (uvicorn) and a
worker sharing a real Redis, its models real ONNX Runtime sessions. Every method answers what
the raw HTTP call does, blocking and async (one call per endpoint: predictions, batches,
explanations, operations and probes), and a ``*_many`` over several requests, some at once,
answers in input order what one request each would."""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path
from typing import Any

import pytest

from service.client import AsyncClient, Client
from service.config import Settings
from service.repository import discover_models
from service.runtime.runner import ModelRunner, load_runners
from tests.api.test_python_client import CASES, _comparable, _plain
from tests.redis_backend.helpers import running_worker
from tests.service_support import live_server, require_model

TEXTS = ["A charming, funny and moving film.", "Dull and far too long.", "Fine.", "I loved it."]


@pytest.fixture(scope="module")
def every_runner(tiny_repo: Path) -> dict[str, ModelRunner]:
    """The worker's models: each the CASES need."""
    names = {model for *_, model, _, _, _ in CASES if model is not None}
    for name in names:
        require_model(tiny_repo, name)
    entries = [e for e in discover_models(tiny_repo) if e.name in names]
    settings = Settings(model_dir=tiny_repo, intra_op_threads=1, warmup=False)
    return load_runners(settings, entries=entries)


async def test_the_client_against_an_api_replica_and_a_worker(make_settings, every_runner):
    pytest.importorskip("shap", reason="the explain extra (shap) is not installed")
    settings = make_settings(max_batch_items=8)
    async with (
        running_worker(settings, every_runner),
        live_server(settings) as srv,
        srv.client() as raw,
    ):
        expected = []
        for *_, verb, path, body in CASES:
            r = await raw.request(verb, path, json=body)
            assert r.status_code == 200, (path, r.text)
            expected.append(_comparable(r.json()))
        texts = [TEXTS[i * 3 % len(TEXTS)] for i in range(30)]
        one = {}
        for t in TEXTS:
            r = await raw.post("/v1/polarity", json={"text": t})
            assert r.status_code == 200, r.text
            one[t] = _comparable(r.json())

        def sync_calls() -> tuple[list[Any], list[Any]]:
            with Client(srv.url) as c:
                got = [getattr(c, name)(*a, **kw) for name, a, kw, *_ in CASES]
                return got, c.polarity_many(texts, concurrency=3, request_id="s")

        sync_got, sync_many = await asyncio.to_thread(sync_calls)
        async with AsyncClient(srv.url) as ac:
            async_got = [await getattr(ac, name)(*a, **kw) for name, a, kw, *_ in CASES]
            async_many = await ac.polarity_many(texts, concurrency=3, request_id="a")
            pos_many = await ac.pos_many(texts, chunk_size=5)
        with Client(srv.url) as c:
            pos_sync = await asyncio.to_thread(functools.partial(c.pos_many, chunk_size=5), texts)
        pos_one = [_comparable((await raw.post("/v1/pos", json={"text": t})).json()) for t in texts]

    for got in (sync_got, async_got):
        for case, want, result in zip(CASES, expected, got, strict=True):
            assert _plain(result) == want, case[0]
    # 30 texts, 8 a request (the replica's NLPSERVE_MAX_BATCH_ITEMS, its OpenAPI maxItems)
    for many, prefix in ((sync_many, "s"), (async_many, "a")):
        assert [_plain(r) for r in many] == [one[t] for t in texts]
        ids = {r.meta.request_id for r in many if r.meta}
        assert ids == {f"{prefix}.{a}-{min(a + 7, 29)}" for a in range(0, 30, 8)}
    assert [_plain(r) for r in pos_many] == pos_one == [_plain(r) for r in pos_sync]

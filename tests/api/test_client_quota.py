"""Per-client in-flight limits (``NLPSERVE_CLIENT_MAX_IN_FLIGHT``, service/api/client_quota.py)
over real HTTP with real API keys: a client at its limit gets 429 ``client_quota`` (in /v2's
shape there) while another is still served; a batch counts its items and is refused whole;
the count returns to 0 however requests end (answered, input error, 504, disconnect,
shutdown); the metrics say who was refused; the setting is refused without a keys file."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from service.api.app import begin_shutdown, create_app
from service.api.client_quota import ClientQuotaConfigError
from service.config import Settings
from tests.service_support import (
    POLARITY_MODEL,
    POS_MODEL,
    LiveServer,
    live_server,
    make_settings,
    metric_value,
    read_metrics,
    wait_for,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

ROOT = Path(__file__).resolve().parents[2]
ALICE = "alice-quota-key-0123456789"
BOB = "bob-quota-key-9876543210xx"
LIMIT = 3
LOADED = f"{POLARITY_MODEL},{POS_MODEL}"  # the LSTMs: a server starts in a second


def as_(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("quota") / "api-keys"
    path.write_text(f"alice {ALICE}\nbob {BOB}\n")
    return path


def settings_for(model_repo: Path, keys_file: Path, **more: Any) -> Settings:
    return make_settings(
        model_repo,
        load_models=LOADED,
        api_keys_file=keys_file,
        client_max_in_flight=LIMIT,
        **more,
    )


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def quota_service(model_repo, keys_file) -> AsyncIterator[LiveServer]:
    async with live_server(settings_for(model_repo, keys_file)) as srv:
        yield srv


@pytest_asyncio.fixture(loop_scope="session")
async def srv(quota_service: LiveServer) -> AsyncIterator[LiveServer]:
    quota_service.queue.resume()
    yield quota_service
    quota_service.queue.resume()
    await wait_for(lambda: not in_flight(quota_service))


def in_flight(srv: LiveServer) -> dict[str, int]:
    quota = srv.state.client_quota
    assert quota is not None
    return dict(quota.in_flight)


def polarity(c: httpx.AsyncClient, key: str, text: str = "a fine film", **headers: str):
    return asyncio.create_task(
        c.post("/v1/polarity", json={"text": text}, headers=as_(key) | headers)
    )


def assert_quota_refusal(r: httpx.Response) -> str:
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) >= 1
    error = r.json()["error"]
    assert error["code"] == "client_quota"
    assert error["limit"] == {"name": "max_in_flight", "value": LIMIT}
    limit = f"the limit for this client is {LIMIT} (NLPSERVE_CLIENT_MAX_IN_FLIGHT)"
    assert limit in error["message"]
    assert "bob" not in error["message"] and "alice" not in error["message"]
    return error["message"]


# --------------------------------------------------------------------------- fairness
async def test_a_client_at_its_limit_is_refused_while_another_is_served(srv):
    q = srv.queue
    q.pause()
    async with srv.client() as c:
        before = await read_metrics(c)
        held = [polarity(c, ALICE, t) for t in ("good film", "bad film", "fine film")]
        await wait_for(lambda: q.depth(POLARITY_MODEL) == 3)
        assert in_flight(srv) == {"alice": 3}
        during = await read_metrics(c)
        assert metric_value(during, "nlpserve_client_in_flight", client="alice") == 3

        message = assert_quota_refusal(await polarity(c, ALICE))
        assert "this client has 3 items in flight and this request needs 1 more" in message
        assert q.depth(POLARITY_MODEL) == 3  # refused before the queue: nothing added

        bobs = polarity(c, BOB, "a great film")  # the other client is admitted
        await wait_for(lambda: q.depth(POLARITY_MODEL) == 4)
        assert in_flight(srv) == {"alice": 3, "bob": 1}
        q.resume()
        assert [(await t).status_code for t in [*held, bobs]] == [200, 200, 200, 200]
        assert (await bobs).json()["label"] == "positive"
        await wait_for(lambda: not in_flight(srv))
        assert (await polarity(c, ALICE)).status_code == 200  # answered: room again

        after = await read_metrics(c)
    assert metric_value(after, "nlpserve_client_in_flight", client="alice") == 0

    def grew(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    assert grew("nlpserve_rejected_total", model=POLARITY_MODEL, reason="client_quota") == 1
    assert grew("nlpserve_client_quota_rejections_total", client="alice") == 1
    assert grew("nlpserve_client_quota_rejections_total", client="bob") == 0
    assert grew("nlpserve_rejected_total", reason="queue_full") == 0


async def test_a_batch_counts_its_items_and_is_refused_whole(srv):
    q = srv.queue
    q.pause()
    pair = {"inputs": [{"text": "the dog runs"}, {"text": "a cat sleeps"}]}
    async with srv.client() as c:
        first = asyncio.create_task(c.post("/v1/pos", json=pair, headers=as_(ALICE)))
        await wait_for(lambda: q.depth(POS_MODEL) == 2)
        assert in_flight(srv) == {"alice": 2}

        # 2 + 2 > 3: the whole batch is refused, none of it queued
        message = assert_quota_refusal(await c.post("/v1/pos", json=pair, headers=as_(ALICE)))
        assert "2 items in flight and this request needs 2 more" in message
        assert q.depth(POS_MODEL) == 2 and in_flight(srv) == {"alice": 2}

        # 2 + 1 fits, on another model: the limit is the client's across models
        one = polarity(c, ALICE)
        await wait_for(lambda: q.depth(POLARITY_MODEL) == 1)
        assert in_flight(srv) == {"alice": 3}

        # more items than the limit could never be admitted: 422, not "retry later"
        four = {"inputs": [{"text": "a"}] * 4}
        r = await c.post("/v1/polarity", json=four, headers=as_(BOB))
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "too_many_items"
        assert "at most 3 in flight (NLPSERVE_CLIENT_MAX_IN_FLIGHT)" in r.json()["error"]["message"]
        assert r.json()["error"]["limit"] == {"name": "max_in_flight", "value": LIMIT}

        q.resume()
        assert (await first).status_code == 200 and (await one).status_code == 200


def v2_body(n: int) -> dict[str, Any]:
    return {"inputs": [{"name": "text", "shape": [n], "datatype": "BYTES", "data": ["ok"] * n}]}


async def test_v2_is_refused_in_its_own_shape_and_counts_items(srv):
    q = srv.queue
    q.pause()
    infer = f"/v2/models/{POLARITY_MODEL}/infer"
    async with srv.client() as c:
        held = asyncio.create_task(c.post(infer, json=v2_body(2), headers=as_(ALICE)))
        await wait_for(lambda: q.depth(POLARITY_MODEL) == 2)
        assert in_flight(srv) == {"alice": 2}
        r = await c.post(infer, json=v2_body(2), headers=as_(ALICE))
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str)
        assert "the limit for this client is 3" in r.json()["error"]
        # an explanation counts one item too: refused at the limit before any SHAP work
        fill = polarity(c, ALICE)
        await wait_for(lambda: in_flight(srv) == {"alice": 3})
        r = await c.post("/v1/polarity/explain", json={"text": "a film"}, headers=as_(ALICE))
        assert_quota_refusal(r)
        q.resume()
        assert (await held).status_code == 200 and (await fill).status_code == 200


# --------------------------------------------------------------------------- no leaks
async def test_every_ending_gives_the_items_back(srv):
    q = srv.queue
    async with srv.client() as c:
        # an error after admission: the tokenizer's 422 (over the model's max length)
        long_pos = {"text": "word " * 400}
        r = await c.post("/v1/pos", json=long_pos, headers=as_(ALICE))
        assert r.status_code == 422, r.text
        assert not in_flight(srv)

        q.pause()
        # 504: the deadline passes while queued
        r = await c.post(
            "/v1/polarity", json={"text": "late"}, headers=as_(ALICE) | {"X-Deadline-Ms": "50"}
        )
        assert r.status_code == 504, r.text
        assert not in_flight(srv)

        # the client goes away while queued (its task is cancelled)
        body = json.dumps({"text": "gone"}).encode()
        request = (
            f"POST /v1/polarity HTTP/1.1\r\nHost: x\r\nX-API-Key: {ALICE}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        writer.write(request)
        await writer.drain()
        await wait_for(lambda: in_flight(srv) == {"alice": 1})
        writer.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
        )
        writer.close()
        await wait_for(lambda: not in_flight(srv))

        # and the whole limit is there again: three admitted at once
        held = [polarity(c, ALICE) for _ in range(LIMIT)]
        await wait_for(lambda: in_flight(srv) == {"alice": LIMIT})
        q.resume()
        assert [(await t).status_code for t in held] == [200] * LIMIT
    await wait_for(lambda: not in_flight(srv))


@pytest.mark.parametrize("drained", [True, False], ids=["drained", "cancelled"])
async def test_shutdown_gives_the_items_back(model_repo, keys_file, drained):
    settings = settings_for(model_repo, keys_file, shutdown_timeout_s=0.2)
    srv = await LiveServer(create_app(settings), settings).start()
    q = srv.queue
    q.pause()
    try:
        async with srv.client() as c:
            held = [polarity(c, ALICE), polarity(c, BOB)]
            await wait_for(lambda: in_flight(srv) == {"alice": 1, "bob": 1})
            if drained:  # what the server's SIGTERM does first: the queue drains, answered
                begin_shutdown(srv.state, 0.2)
            # else uvicorn's graceful timeout (1 s) cancels the handlers still waiting
            await srv.stop()
            answers = await asyncio.gather(*held, return_exceptions=True)
    finally:
        q.resume()
        await srv.stop()
    if drained:  # cancelled: the test harness sets no `stopping`, the status says little
        assert [getattr(a, "status_code", None) for a in answers] == [200, 200], answers
    assert not in_flight(srv)


# --------------------------------------------------------------------------- settings
async def test_the_limit_needs_a_keys_file(model_repo, tmp_path):
    assert Settings(client_max_in_flight="").client_max_in_flight is None  # compose's ${VAR:-}
    with pytest.raises(ClientQuotaConfigError, match="set NLPSERVE_API_KEYS_FILE too"):
        create_app(make_settings(model_repo, client_max_in_flight=LIMIT))
    env = {k: v for k, v in os.environ.items() if not k.startswith("NLPSERVE_")}
    env |= {"NLPSERVE_CLIENT_MAX_IN_FLIGHT": "4", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--models", str(tmp_path), "--port", "0"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        "nlpserve: invalid setting: NLPSERVE_CLIENT_MAX_IN_FLIGHT limits each client, and "
        "clients are known only by their API key: set NLPSERVE_API_KEYS_FILE too "
        "(docs/deploy.md, Authentication), or unset it"
    ]


async def test_no_limit_by_default(inprocess_service):
    assert inprocess_service.state.client_quota is None
    async with inprocess_service.client() as c:
        assert "nlpserve_client_in_flight" not in await read_metrics(c)


async def test_with_the_response_cache_only_misses_are_counted_and_given_back(
    model_repo, keys_file
):
    """The two merged features together: a full hit takes none of the client's limit, a
    partial hit needs room for its misses only, and a miss the client abandons gives its
    items back and is not kept."""
    async with live_server(settings_for(model_repo, keys_file, response_cache_mb=1)) as srv:
        q, cache = srv.queue, srv.state.response_cache
        assert cache is not None
        async with srv.client() as c:
            r = await c.post("/v1/polarity", json={"text": "known"}, headers=as_(ALICE))
            assert r.status_code == 200 and len(cache) == 1
            q.pause()
            held = [polarity(c, ALICE, f"held {i}") for i in range(LIMIT)]
            await wait_for(lambda: in_flight(srv) == {"alice": LIMIT})

            r = await c.post("/v1/polarity", json={"text": "known"}, headers=as_(ALICE))
            assert r.status_code == 200, r.text  # a full hit: no room needed
            mixed = {"inputs": [{"text": "known"}, {"text": "new"}]}
            message = assert_quota_refusal(
                await c.post("/v1/polarity", json=mixed, headers=as_(ALICE))
            )
            assert f"{LIMIT} items in flight and this request needs 1 more" in message

            for t in held:  # the client goes away: the items come back, nothing is kept
                t.cancel()
            await wait_for(lambda: not in_flight(srv))
            q.resume()
            r = await c.post("/v1/polarity", json=mixed, headers=as_(ALICE))
            assert r.status_code == 200, r.text
            assert r.headers["server-timing"].startswith("cache;desc=partial")
            # over the limit once the cache's answers are taken out: the message counts
            # what would run (LIMIT + 1 misses), not "items in one request" (LIMIT + 2)
            over = {"inputs": [{"text": "known"}] + [{"text": f"miss {i}"} for i in range(4)]}
            r = await c.post("/v1/polarity", json=over, headers=as_(ALICE))
            assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_items"
            message = r.json()["error"]["message"]
            assert message.startswith(f"this request needs {LIMIT + 1} items run at once"), message
            assert "the response cache answers the rest" in message, message
        assert not in_flight(srv)
        assert len(cache) == 2  # "known" and "new"; none of the abandoned ones

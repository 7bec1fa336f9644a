"""Priority classes for predictions (``X-Priority: batch``, gRPC ``x-priority``, a keys-file
client's ``priority=batch``): batch-priority sequences run only when no interactive prediction
of the model waits, a starved one ends at its own deadline (504), and a batch client cannot
raise itself to interactive. Real server, real models; order is read from the queue's batch
log (one inference thread: batches run one after the other), never from timings."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from service.queueing.inprocess import InProcessQueue
from tests.api.test_errors import assert_error
from tests.redis_support import free_port
from tests.service_support import (
    POLARITY_MODEL,
    GatedRunner,
    LiveServer,
    live_server,
    make_settings,
    metric_value,
    read_metrics,
    wait_for,
)

V1 = "/v1/polarity"
V2 = f"/v2/models/{POLARITY_MODEL}/infer"
BULK_KEY, WEB_KEY = "b" * 32, "w" * 32


def v2_body(text: str) -> dict:
    return {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}


def lanes(q: InProcessQueue) -> list[str]:
    return [r.lane for r in q.batch_log if r.model == POLARITY_MODEL]


async def queued(srv: LiveServer, n: int) -> None:
    await wait_for(lambda: srv.queue.depth(POLARITY_MODEL) == n)


@pytest.fixture
async def srv(model_repo, tmp_path: Path):
    keys = tmp_path / "keys"
    keys.write_text(f"bulk {BULK_KEY} priority=batch\nweb {WEB_KEY}\n")
    settings = make_settings(
        model_repo,
        variant="fp32",
        inference_threads=1,  # one batch at a time: the batch log is the order they ran
        api_keys_file=keys,
        grpc_port=free_port(),
    )
    async with live_server(settings) as s:
        yield s


def as_client(key: str, **headers: str) -> dict[str, str]:
    return {"X-API-Key": key, **headers}


async def test_an_interactive_request_queued_after_a_batch_one_runs_first(srv):
    """Queued first, the batch-priority request still runs after the interactive one; it is
    answered once interactive work stops (here: at once), on /v1 and /v2 alike."""
    q = srv.queue
    async with srv.client() as c:
        for path, body in ((V1, {"text": "a fine film"}), (V2, v2_body("a fine film"))):
            q.batch_log.clear()
            q.pause()
            batch = asyncio.create_task(
                c.post(path, json=body, headers=as_client(WEB_KEY, **{"X-Priority": "batch"}))
            )
            await queued(srv, 1)
            text = await read_metrics(c)
            assert metric_value(text, "nlpserve_queue_lane_depth", lane="batch") == 1
            assert metric_value(text, "nlpserve_queue_lane_depth", lane="predict") == 0
            interactive = asyncio.create_task(
                c.post(path, json=body, headers=as_client(WEB_KEY, **{"X-Priority": "interactive"}))
            )
            await queued(srv, 2)
            q.resume()
            assert (await interactive).status_code == 200
            assert (await batch).status_code == 200
            assert lanes(q) == ["predict", "batch"], path


async def test_grpc_x_priority_metadata_is_the_header(srv):
    tc = pytest.importorskip("tritonclient.grpc.aio", reason="tritonclient[grpc] is not installed")
    from tritonclient.utils import InferenceServerException

    from tests.api.test_grpc_v2 import inputs_of

    q = srv.queue
    client = tc.InferenceServerClient(f"127.0.0.1:{srv.settings.grpc_port}")
    try:
        q.pause()
        batch = asyncio.create_task(
            client.infer(
                POLARITY_MODEL,
                inputs_of(POLARITY_MODEL, 1),
                headers={"x-api-key": WEB_KEY, "x-priority": "batch"},
            )
        )
        await queued(srv, 1)
        async with srv.client() as c:
            interactive = asyncio.create_task(
                c.post(V1, json={"text": "fine"}, headers=as_client(WEB_KEY))
            )
            await queued(srv, 2)
            q.resume()
            assert (await interactive).status_code == 200
        assert (await batch).as_numpy("label").shape == (1,)
        assert lanes(q) == ["predict", "batch"]
        with pytest.raises(InferenceServerException) as e:
            await client.infer(
                POLARITY_MODEL,
                inputs_of(POLARITY_MODEL, 1),
                headers={"x-api-key": WEB_KEY, "x-priority": "urgent"},
            )
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "X-Priority must be one of interactive, batch" in e.value.message()
    finally:
        q.resume()
        await client.close()


async def test_a_batch_client_runs_as_batch_and_cannot_raise_itself(srv):
    """The keys file's ``priority=batch`` is the client's class: without the header, and even
    with ``X-Priority: interactive``, its predictions run after an interactive client's."""
    q = srv.queue
    async with srv.client() as c:
        for headers in ({}, {"X-Priority": "interactive"}, {"X-Priority": "batch"}):
            q.batch_log.clear()
            q.pause()
            bulk = asyncio.create_task(
                c.post(V1, json={"text": "fine"}, headers=as_client(BULK_KEY, **headers))
            )
            await queued(srv, 1)
            web = asyncio.create_task(c.post(V1, json={"text": "fine"}, headers=as_client(WEB_KEY)))
            await queued(srv, 2)
            q.resume()
            assert (await web).status_code == 200 and (await bulk).status_code == 200
            assert lanes(q) == ["predict", "batch"], headers


async def test_request_metrics_are_split_by_priority_class(srv):
    """nlpserve_requests_total and nlpserve_request_duration_seconds carry the class each
    request ran in (priority=interactive|batch): the header's, a batch client's whatever it
    asks; a refused header (400) counts under the client's own class. gRPC alike."""
    series = {"model": POLARITY_MODEL, "endpoint": "predict"}
    sent = [
        (as_client(WEB_KEY), 200, "interactive"),
        (as_client(WEB_KEY, **{"X-Priority": "batch"}), 200, "batch"),
        (as_client(BULK_KEY), 200, "batch"),
        (as_client(BULK_KEY, **{"X-Priority": "interactive"}), 200, "batch"),
        (as_client(BULK_KEY, **{"X-Priority": "urgent"}), 400, "batch"),
        (as_client(WEB_KEY, **{"X-Priority": "urgent"}), 400, "interactive"),
    ]

    def counts(text: str) -> dict[tuple[str, str, str], float]:
        return {
            (name, status, priority): metric_value(
                text, name, **series, status=status, priority=priority
            )
            for name in ("nlpserve_requests_total", "nlpserve_request_duration_seconds_count")
            for status in ("200", "400")
            for priority in ("interactive", "batch")
        }

    async with srv.client() as c:
        before = counts(await read_metrics(c))
        for headers, status, _ in sent:
            r = await c.post(V1, json={"text": "fine"}, headers=headers)
            assert r.status_code == status, headers
        after = counts(await read_metrics(c))
    want = {key: 0.0 for key in before}
    for _, status, priority in sent:
        for name in ("nlpserve_requests_total", "nlpserve_request_duration_seconds_count"):
            want[(name, str(status), priority)] += 1
    assert {k: after[k] - before[k] for k in before} == want

    tc = pytest.importorskip("tritonclient.grpc.aio", reason="tritonclient[grpc] is not installed")
    from tests.api.test_grpc_v2 import inputs_of

    client = tc.InferenceServerClient(f"127.0.0.1:{srv.settings.grpc_port}")
    grpc = {"model": POLARITY_MODEL, "endpoint": "grpc", "status": "200"}
    try:
        async with srv.client() as c:
            for key in (WEB_KEY, BULK_KEY):
                await client.infer(
                    POLARITY_MODEL, inputs_of(POLARITY_MODEL, 1), headers={"x-api-key": key}
                )
            await client.infer(
                POLARITY_MODEL,
                inputs_of(POLARITY_MODEL, 1),
                headers={"x-api-key": WEB_KEY, "x-priority": "batch"},
            )
            text = await read_metrics(c)
    finally:
        await client.close()
    assert metric_value(text, "nlpserve_requests_total", **grpc, priority="batch") == 2
    assert metric_value(text, "nlpserve_requests_total", **grpc, priority="interactive") == 1


@pytest.mark.parametrize("value", ["urgent", "", "batch, interactive"])
async def test_a_bad_priority_is_400_invalid_header(srv, value):
    headers = as_client(WEB_KEY, **{"X-Priority": value})
    why = "X-Priority must be one of interactive, batch"
    async with srv.client() as c:
        err = assert_error(
            await c.post(V1, json={"text": "fine"}, headers=headers), 400, "invalid_header"
        )
        assert why in err["message"]
        r = await c.post(V2, json=v2_body("fine"), headers=headers)  # V2's error shape
        assert r.status_code == 400 and why in r.json()["error"]


async def test_a_starved_batch_request_ends_at_its_deadline_and_never_runs(srv):
    """While interactive work holds the model, a batch-priority request waits, up to its own
    deadline: then 504, and its sequence never runs; the interactive ones are answered."""
    q = srv.queue
    gated = GatedRunner(q.runners[POLARITY_MODEL])
    q.runners[POLARITY_MODEL] = gated
    try:
        async with srv.client() as c:
            first = asyncio.create_task(c.post(V1, json={"text": "x"}, headers=as_client(WEB_KEY)))
            await wait_for(lambda: gated.active == 1)
            starved = asyncio.create_task(
                c.post(
                    V1,
                    json={"text": "x x x x x x x"},
                    headers=as_client(BULK_KEY, **{"X-Deadline-Ms": "400"}),
                )
            )
            await queued(srv, 1)
            later = asyncio.create_task(
                c.post(V1, json={"text": "x x x"}, headers=as_client(WEB_KEY))
            )
            assert_error(await starved, 504, "deadline_exceeded")
            gated.gate.set()
            assert (await first).status_code == 200 and (await later).status_code == 200
        assert len(gated.started) == 2 and 7 not in {n for s in gated.started for n in s}
    finally:
        gated.gate.set()
        q.runners[POLARITY_MODEL] = gated.inner


async def test_interactive_admission_does_not_count_batch_work_ahead(srv):
    """The deadline admission (429 queue_full when the work ahead outlasts the deadline) of
    an interactive request counts no batch-priority sequence; a batch request counts them."""
    q = srv.queue
    async with srv.client() as c:
        r = await c.post(V1, json={"text": "fine"}, headers=as_client(WEB_KEY))
        assert r.status_code == 200  # a pace measured
        q.pause()
        try:
            held = [
                asyncio.create_task(c.post(V1, json={"text": "fine"}, headers=as_client(BULK_KEY)))
                for _ in range(3)
            ]
            await queued(srv, 3)
            q._seq_cost[POLARITY_MODEL] = 10.0  # 10 s per sequence, set
            headers = {"X-Deadline-Ms": "20000"}  # 3 ahead + its own: 40 s > 20 s
            r = await c.post(V1, json={"text": "fine"}, headers=as_client(BULK_KEY, **headers))
            assert_error(r, 429, "queue_full")
            interactive = asyncio.create_task(
                c.post(V1, json={"text": "fine"}, headers=as_client(WEB_KEY, **headers))
            )
            await queued(srv, 4)  # admitted: nothing interactive ahead
        finally:
            q.resume()
        assert (await interactive).status_code == 200
        assert all(r.status_code == 200 for r in await asyncio.gather(*held))


async def test_with_the_response_cache_an_interactive_request_never_waits_on_a_batch_run(
    model_repo,
):
    """The cache's single-flight shares a run between identical items; an interactive
    request must not wait on a batch-priority run (which waits for every interactive one):
    it runs its own, first."""
    settings = make_settings(model_repo, variant="fp32", inference_threads=1, response_cache_mb=8.0)
    async with live_server(settings) as srv, srv.client() as c:
        q = srv.queue
        q.pause()
        try:
            batch = asyncio.create_task(
                c.post(V1, json={"text": "the same"}, headers={"X-Priority": "batch"})
            )
            await queued(srv, 1)
            interactive = asyncio.create_task(c.post(V1, json={"text": "the same"}))
            await queued(srv, 2)  # its own item: not waiting on the batch one's run
        finally:
            q.resume()
        answers = await asyncio.gather(batch, interactive)
        assert all(r.status_code == 200 for r in answers)
        assert answers[0].json() == answers[1].json()
        assert lanes(q) == ["predict", "batch"]

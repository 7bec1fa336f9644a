"""gRPC's streaming inference (ModelStreamInfer) and model repository RPCs, called by
tritonclient.grpc's stream API (start_stream / async_stream_infer / stop_stream) and a raw
stub, against a real server on a free gRPC port with the tiny trained models: each request
of a stream answered as its ModelInfer is, with its id; a refusal as that request's
error_message while the stream goes on; the per-stream bound; keys checked on the stream;
a cancelled stream's work withdrawn, its counts back to 0."""

from __future__ import annotations

import asyncio
import gc
import logging
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from service.api.app import create_app
from tests.api.test_grpc_v2 import _text, as_rest, close, inputs_of
from tests.api.test_v2 import MODELS
from tests.redis_support import free_port, redis_backend
from tests.service_support import (
    POLARITY_MODEL,
    POS_MODEL,
    QA_MODEL,
    LiveServer,
    live_server,
    make_settings,
    metric_value,
    read_metrics,
    require_model,
    wait_for,
)

grpc = pytest.importorskip("grpc", reason="the grpc extra is not installed")
tc = pytest.importorskip("tritonclient.grpc.aio", reason="tritonclient[grpc] is not installed")
import tritonclient.grpc as tc_sync  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from service.api.grpc import grpc_predict_v2_pb2 as pb  # noqa: E402
from service.api.grpc import grpc_predict_v2_pb2_grpc as pb_grpc  # noqa: E402
from service.api.grpc.server import _settled  # noqa: E402

pytestmark = pytest.mark.asyncio(loop_scope="session")

BOUND = 4  # NLPSERVE_GRPC_STREAM_MAX_IN_FLIGHT of these servers


@pytest.fixture(autouse=True)
def _all_models(model_repo):
    for name in MODELS:
        require_model(model_repo, name)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def srv(model_repo):
    """fp32: answers that do not move with batch-mates, so a stream's answers (batched
    together) can be compared with ModelInfer's."""
    settings = make_settings(
        model_repo, variant="fp32", grpc_port=free_port(), grpc_stream_max_in_flight=BOUND
    )
    async with live_server(settings) as s:
        yield s


@pytest_asyncio.fixture(loop_scope="session")
async def triton(srv):
    srv.queue.resume()
    client = tc.InferenceServerClient(f"127.0.0.1:{srv.settings.grpc_port}")
    try:
        yield client
    finally:
        await client.close()
        srv.queue.resume()


class Stream:
    """tritonclient.grpc's stream API (threads of its own) with its answers awaited on the
    test's loop. Its blocking calls run in a thread: the server runs on this loop."""

    def __init__(self, port: int, headers: dict[str, str] | None = None) -> None:
        self.client = tc_sync.InferenceServerClient(f"127.0.0.1:{port}")
        self.headers = headers
        self.loop = asyncio.get_running_loop()
        self.answers: asyncio.Queue[tuple[Any, Any]] = asyncio.Queue()

    def _callback(self, result: Any, error: Any) -> None:  # on gRPC's thread
        self.loop.call_soon_threadsafe(self.answers.put_nowait, (result, error))

    async def __aenter__(self) -> Stream:
        await asyncio.to_thread(self.client.start_stream, self._callback, headers=self.headers)
        return self

    def send(self, model: str, inputs: list[Any], request_id: str, **kw: Any) -> None:
        self.client.async_stream_infer(model, inputs, request_id=request_id, **kw)

    async def next(self) -> tuple[Any, Any]:
        return await asyncio.wait_for(self.answers.get(), 60)

    async def cancel(self) -> None:
        await asyncio.to_thread(self.client.stop_stream, True)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.client.stop_stream, True)
        await asyncio.to_thread(self.client.close)


async def _metrics(srv) -> str:
    async with srv.client() as c:
        return await read_metrics(c)


def _n(model: str, k: int) -> int:
    return 1 + k % 3  # mixed lengths: 1 to 3 texts (QA: pairs) per request


# ------------------------------------------------------------------ answers
async def test_a_streams_requests_get_model_infers_answers_with_their_ids(srv, triton):
    """Many requests on one stream, of three models and mixed lengths: each answered once,
    with its id, as ModelInfer answers the same request; counted as grpc_stream."""
    plan = [(model, _n(model, k), f"s-{model}-{k}") for k in range(6) for model in MODELS]
    before = await _metrics(srv)
    async with Stream(srv.settings.grpc_port) as stream:
        for model, n, rid in plan:
            stream.send(model, inputs_of(model, n), rid)
        got = {}
        for _ in plan:
            result, error = await stream.next()
            assert error is None, error
            response = result.get_response()
            assert response.id not in got
            got[response.id] = result
    assert set(got) == {rid for _, _, rid in plan}
    for model, n, rid in plan:
        result = got[rid]
        assert result.get_response().model_name == model
        alone = await triton.infer(model, inputs_of(model, n))
        names = [o.name for o in alone.get_response().outputs]
        close(as_rest(result, names), as_rest(alone, names))
    after = await _metrics(srv)
    for model in MODELS:
        series = dict(model=model, endpoint="grpc_stream", status="200")
        assert metric_value(after, "nlpserve_requests_total", **series) == (
            metric_value(before, "nlpserve_requests_total", **series) + 6
        )


async def test_a_bad_request_is_its_error_and_the_stream_goes_on(srv):
    async with Stream(srv.settings.grpc_port) as stream:
        stream.send(POLARITY_MODEL, [_text("txt", ["a"])], "bad-name")
        first, error = await stream.next()
        assert first is None and error is not None
        assert error.message().startswith("INVALID_ARGUMENT: unknown input 'txt'; ")
        assert error.message().endswith(" (request 'bad-name')")
        stream.send(POLARITY_MODEL, [_text("text", ["a", "b"], shape=[1, 2])], "bad-shape")
        _, error = await stream.next()
        assert "input 'text' has shape [1, 2]; text inputs have shape [N]" in error.message()
        assert "(request 'bad-shape')" in error.message()
        stream.send("nope", [_text("text", ["a"])], "bad-model")
        _, error = await stream.next()
        assert error.message().startswith("NOT_FOUND: no model named 'nope' is loaded")
        stream.send(POLARITY_MODEL, inputs_of(POLARITY_MODEL, 2), "good")
        result, error = await stream.next()
    assert error is None and result.get_response().id == "good"
    assert result.as_numpy("label").shape == (2,)


async def test_a_raw_stub_sees_an_errors_request_id(srv):
    """A refusal's ModelStreamInferResponse carries the request's id and model in
    infer_response, beside error_message; the stream's x-request-id comes back in its
    trailers, as ModelInfer's does."""
    good = pb.ModelInferRequest(model_name=POS_MODEL, id="ok")
    good.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
        b"The dog barks."
    )
    bad = pb.ModelInferRequest(model_name=POS_MODEL, id="oops")
    bad.inputs.add(name="text", datatype="BYTES", shape=[1])  # no element for shape [1]

    async def requests():
        yield bad
        yield good

    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.settings.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        call = stub.ModelStreamInfer(requests(), timeout=30, metadata=(("x-request-id", "st-1"),))
        answers = [a async for a in call]
        assert dict(await call.trailing_metadata())["x-request-id"] == "st-1"
    by_id = {a.infer_response.id: a for a in answers}
    assert set(by_id) == {"ok", "oops"}
    assert by_id["oops"].error_message.startswith("INVALID_ARGUMENT: ")
    assert by_id["oops"].infer_response.model_name == POS_MODEL
    assert not by_id["oops"].infer_response.outputs
    assert by_id["ok"].error_message == "" and by_id["ok"].infer_response.outputs[0].name


async def test_a_stream_runs_at_most_its_bound_at_once(srv):
    """With the queue held, BOUND of a stream's requests are admitted and the rest wait
    unread; released, every one is answered."""
    q = srv.queue
    q.pause()
    try:
        async with Stream(srv.settings.grpc_port) as stream:
            for k in range(BOUND + 3):
                stream.send(POLARITY_MODEL, inputs_of(POLARITY_MODEL, 1), f"b-{k}")
            await wait_for(lambda: q.depth(POLARITY_MODEL) == BOUND)
            for _ in range(20):  # the others stay unread while the bound is held
                await asyncio.sleep(0.01)
                assert q.depth(POLARITY_MODEL) == BOUND
            q.resume()
            ids = set()
            for _ in range(BOUND + 3):
                result, error = await stream.next()
                assert error is None, error
                ids.add(result.get_response().id)
        assert ids == {f"b-{k}" for k in range(BOUND + 3)}
    finally:
        q.resume()


async def test_a_streams_requests_share_the_response_cache(model_repo):
    """The same run_work as ModelInfer: a stream's repeat of a ModelInfer is a cache hit."""
    settings = make_settings(model_repo, variant="fp32", grpc_port=free_port(), response_cache_mb=1)
    async with live_server(settings) as s:
        client = tc.InferenceServerClient(f"127.0.0.1:{settings.grpc_port}")
        try:
            first = await client.infer(POS_MODEL, inputs_of(POS_MODEL, 1))
        finally:
            await client.close()
        before = await _metrics(s)
        async with Stream(settings.grpc_port) as stream:
            stream.send(POS_MODEL, inputs_of(POS_MODEL, 1), "again")
            result, error = await stream.next()
        after = await _metrics(s)
    assert error is None
    assert as_rest(result, ["tokens", "tags"]) == as_rest(first, ["tokens", "tags"])
    hits = "nlpserve_response_cache_hits_total"
    assert metric_value(after, hits, model=POS_MODEL) == (
        metric_value(before, hits, model=POS_MODEL) + 1
    )


async def test_redis_mode_serves_a_stream(model_repo):
    settings = make_settings(model_repo, grpc_port=free_port())
    async with (
        redis_backend(settings) as s,
        live_server(s),
        Stream(settings.grpc_port) as stream,
    ):
        for k in range(3):
            stream.send(POLARITY_MODEL, inputs_of(POLARITY_MODEL, 1 + k), f"r-{k}")
        answers = [await stream.next() for _ in range(3)]
    assert all(error is None for _, error in answers)
    shapes = {r.get_response().id: r.as_numpy("label").shape for r, _ in answers}
    assert shapes == {"r-0": (1,), "r-1": (2,), "r-2": (3,)}


# ------------------------------------------------------------------ keys, cancelling
@pytest_asyncio.fixture(loop_scope="session")
async def keyed(model_repo, tmp_path: Path):
    """Keys (alice's) and a per-client limit: the quota's counts are visible."""
    keys = tmp_path / "keys"
    keys.write_text(f"alice {'a' * 32}\n")
    settings = make_settings(
        model_repo,
        grpc_port=free_port(),
        api_keys_file=keys,
        client_max_in_flight=50,
        grpc_stream_max_in_flight=BOUND,
    )
    async with live_server(settings) as s:
        yield s


ALICE = {"x-api-key": "a" * 32}


async def test_a_stream_without_a_key_is_unauthenticated(keyed):
    async with Stream(keyed.settings.grpc_port) as stream:
        # refused on its metadata, before any request: the stream itself ends
        result, error = await stream.next()
        with pytest.raises(InferenceServerException, match="no longer in valid state"):
            stream.send(POS_MODEL, inputs_of(POS_MODEL, 1), "x")
    assert result is None and error.status() == "StatusCode.UNAUTHENTICATED"
    assert "API key" in error.message()
    async with Stream(keyed.settings.grpc_port, headers=ALICE) as stream:
        stream.send(POS_MODEL, inputs_of(POS_MODEL, 1), "y")
        result, error = await stream.next()
    assert error is None and result.get_response().id == "y"


async def test_a_key_removed_by_a_reload_refuses_an_open_streams_next_requests(
    model_repo, tmp_path: Path
):
    """ "To stop a client, delete its lines" holds for its open streams too: after the
    reload a stream opened with that key gets each next request refused UNAUTHENTICATED
    in-stream (not run as a client the quota no longer knows, with no limit)."""
    keys = tmp_path / "keys"
    keys.write_text(f"alice {'a' * 32}\nbob {'b' * 32}\n")
    settings = make_settings(
        model_repo, grpc_port=free_port(), api_keys_file=keys, client_max_in_flight=50
    )
    async with live_server(settings) as s:
        api_keys = s.state.api_keys
        assert api_keys is not None
        async with Stream(settings.grpc_port, headers=ALICE) as stream:
            stream.send(POS_MODEL, inputs_of(POS_MODEL, 1), "before")
            result, error = await stream.next()
            assert error is None and result.get_response().id == "before"
            keys.write_text(f"bob {'b' * 32}\n")  # alice's key revoked
            assert api_keys.reload()
            stream.send(POS_MODEL, inputs_of(POS_MODEL, 1), "after")
            result, error = await stream.next()
            assert result is None and error is not None
            assert error.message().startswith("UNAUTHENTICATED: invalid API key")
            assert error.message().endswith("(request 'after')")
        metrics = await _metrics(s)
    failures = metric_value(metrics, "nlpserve_auth_failures_total", reason="invalid")
    assert failures == 1


async def test_cancelling_a_stream_withdraws_its_work(keyed):
    """A stream cancelled with requests queued: none runs, the queue and the client's
    in-flight count return to 0, each counted as 499; the next stream is served."""
    q = keyed.queue
    q.pause()
    ran_before = len(q.batch_log)
    before = await _metrics(keyed)
    try:
        async with Stream(keyed.settings.grpc_port, headers=ALICE) as stream:
            for k in range(BOUND):
                stream.send(POLARITY_MODEL, inputs_of(POLARITY_MODEL, 2), f"c-{k}")
            await wait_for(lambda: q.depth(POLARITY_MODEL) == 2 * BOUND)
            held = await _metrics(keyed)
            assert metric_value(held, "nlpserve_client_in_flight", client="alice") == 2 * BOUND
            await stream.cancel()
        await wait_for(lambda: q.waiting == 0)  # withdrawn from the queue
        q.resume()  # the paused queue drops withdrawn work when it next looks
        await wait_for(lambda: q.depth(POLARITY_MODEL) == 0)
        assert len(q.batch_log) == ran_before  # nothing of it ran
        series = dict(model=POLARITY_MODEL, endpoint="grpc_stream", status="499")

        async def counted() -> bool:
            m = await _metrics(keyed)
            return metric_value(m, "nlpserve_requests_total", **series) == (
                metric_value(before, "nlpserve_requests_total", **series) + BOUND
            )

        for _ in range(500):
            if await counted():
                break
            await asyncio.sleep(0.01)
        after = await _metrics(keyed)
        assert await counted(), after
        assert metric_value(after, "nlpserve_client_in_flight", client="alice") == 0
        assert metric_value(after, "nlpserve_queue_depth", model=POLARITY_MODEL) == 0
        assert keyed.state.client_quota is not None
        assert keyed.state.client_quota.in_flight.get("alice", 0) == 0
        async with Stream(keyed.settings.grpc_port, headers=ALICE) as stream:
            stream.send(POLARITY_MODEL, inputs_of(POLARITY_MODEL, 1), "after")
            result, error = await stream.next()
        assert error is None and result.get_response().id == "after"
    finally:
        q.resume()


async def test_shutdown_answers_a_streams_requests_then_ends_it(model_repo):
    """SIGTERM's shutdown with a stream open: its request in flight is answered, then the
    stream ends UNAVAILABLE at once (not when the shutdown's grace runs out), so its
    client opens one on another replica."""
    settings = make_settings(model_repo, grpc_port=free_port(), shutdown_timeout_s=30)
    srv = await LiveServer(create_app(settings), settings).start()
    stopping = None
    try:
        async with Stream(settings.grpc_port) as stream:
            stream.send(POS_MODEL, inputs_of(POS_MODEL, 1), "first")
            result, error = await stream.next()
            assert error is None and result.get_response().id == "first"
            q = srv.queue
            q.pause()
            stream.send(POS_MODEL, inputs_of(POS_MODEL, 1), "held")
            await wait_for(lambda: q.depth(POS_MODEL) == 1)
            stopping = asyncio.create_task(srv.stop())
            await wait_for(lambda: srv.state.stopping)
            q.resume()
            result, error = await stream.next()
            assert error is None and result.get_response().id == "held"  # drained, answered
            result, error = await stream.next()
            assert result is None and error.status() == "StatusCode.UNAVAILABLE"
            assert "shutting down" in error.message()
            await asyncio.wait_for(stopping, 20)  # well within the 30 s grace
    finally:
        if stopping is None:
            await srv.stop()
        else:
            await stopping


# ------------------------------------------------------------------ repository
async def test_repository_index_lists_the_served_models(srv, triton):
    index = await triton.get_model_repository_index(as_json=True)
    want = [
        {"name": m, "version": srv.state.tasks[m].manifest.version, "state": "READY"}
        for m in sorted(MODELS)
    ]
    assert [m for m in index["models"] if m["name"] in MODELS] == want
    assert {m["name"] for m in index["models"]} == set(srv.state.tasks)


@pytest.mark.parametrize("call", ["load_model", "unload_model"])
async def test_load_and_unload_are_unimplemented_and_say_why(triton, call):
    with pytest.raises(InferenceServerException) as e:
        await getattr(triton, call)(QA_MODEL)
    assert e.value.status() == "StatusCode.UNIMPLEMENTED"
    assert "does not load or unload models at runtime" in e.value.message()


async def test_repository_rpcs_need_a_key(keyed):
    client = tc.InferenceServerClient(f"127.0.0.1:{keyed.settings.grpc_port}")
    try:
        for call in (client.get_model_repository_index(), client.load_model(POS_MODEL)):
            with pytest.raises(InferenceServerException) as e:
                await call
            assert e.value.status() == "StatusCode.UNAUTHENTICATED"
        index = await client.get_model_repository_index(headers=ALICE, as_json=True)
        assert {m["name"] for m in index["models"]} == set(keyed.state.tasks)
    finally:
        await client.close()


async def test_a_stream_requests_failure_is_retrieved_and_logged_once(caplog):
    """A stream's answer task failing while the stream still reads (a write to a call the
    client just cancelled, a bug) is awaited by nobody: its done-callback retrieves and
    logs it once, so asyncio never reports "Task exception was never retrieved". (A real
    stream cancelled mid-write does not fail at a chosen moment: the callback is tested.)"""
    loop = asyncio.get_running_loop()
    unretrieved: list[str] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: unretrieved.append(ctx["message"]))
    running: set[asyncio.Task[None]] = set()
    failed: list[BaseException] = []

    async def fails() -> None:
        raise RuntimeError("write failed")

    try:
        with caplog.at_level(logging.ERROR, logger="service.api.grpc.server"):
            for coro in (fails(), asyncio.sleep(0), asyncio.sleep(10)):
                work = asyncio.create_task(coro)
                running.add(work)
                work.add_done_callback(lambda w: _settled(w, running, failed))
            work.cancel()  # withdrawn (the stream cancelled): not a failure
            for _ in range(100):
                if not running:
                    break
                await asyncio.sleep(0)
            del work
            gc.collect()  # a task's unretrieved exception is reported at its collection
    finally:
        loop.set_exception_handler(previous)
    assert not running and unretrieved == []
    assert [str(e) for e in failed] == ["write failed"]
    assert [r.getMessage() for r in caplog.records] == ["gRPC stream request failed"]

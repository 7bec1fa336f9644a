"""The load generator's requests over the other protocols: REST V2 and gRPC ``ModelInfer``.

``bench.loadgen`` makes ``/v1`` requests (one item each). The same items, one per request,
become a V2 inference (``/v2/models/<model>/infer``, texts as a ``BYTES [1]`` tensor per
input) or a gRPC ``ModelInfer`` (the inputs in ``raw_input_contents``, each element a 4-byte
little-endian length and its bytes: tritonclient's way, so what a Triton client sends). Each
asks for every output, as a ``/v1`` answer carries every field. The gRPC client is a raw
``grpc.aio`` stub of the service's own generated modules over one channel by default (HTTP/2
multiplexes the calls; ``channels`` opens more), lighter than tritonclient's wrapper: the
benchmark measures the server, so the client should cost the shared cores as little as it
can. :func:`run_grpc_stream_load` sends the same requests on ``ModelStreamInfer`` streams.
Needs the ``grpc`` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from bench.loadgen import MODEL_TASKS, RequestSpec, Result


@contextlib.asynccontextmanager
async def ready_stubs(target: str, channels: int) -> AsyncIterator[list[Any]]:
    """A stub on each of ``channels`` channels to ``target``, connected; closed on leaving.
    A local subchannel pool each: channels of one process to one target otherwise share one
    connection."""
    import grpc

    from service.api.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

    opened = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(max(1, channels))
    ]
    try:
        await asyncio.gather(*(c.channel_ready() for c in opened))
        yield [pb_grpc.GRPCInferenceServiceStub(c) for c in opened]
    finally:
        await asyncio.gather(*(c.close() for c in opened))


# The V2 inputs of each task, in the order the protocol takes them (docs/service.md).
V2_INPUTS = {"detect": ("text",), "polarity": ("text",), "pos": ("text",),
             "qa": ("question", "context")}  # fmt: skip


def _inputs(model: str, spec: RequestSpec) -> list[tuple[str, str]]:
    task = MODEL_TASKS.get(model, model)
    return [(name, spec.payload[name]) for name in V2_INPUTS[task]]


def v2_rest_specs(model: str, specs: Sequence[RequestSpec]) -> list[RequestSpec]:
    """The same items as REST V2 inferences."""
    path = f"/v2/models/{model}/infer"
    out = []
    for s in specs:
        inputs = [{"name": n, "shape": [1], "datatype": "BYTES", "data": [v]}
                  for n, v in _inputs(model, s)]  # fmt: skip
        out.append(RequestSpec(s.id, path, {"inputs": inputs}, s.tokens))
    return out


def grpc_request(model: str, spec: RequestSpec) -> Any:
    """The item as a ``ModelInferRequest`` (inputs in ``raw_input_contents``)."""
    from service.api.grpc import grpc_predict_v2_pb2 as pb

    request = pb.ModelInferRequest(model_name=model, id=str(spec.id))
    for name, value in _inputs(model, spec):
        request.inputs.add(name=name, datatype="BYTES", shape=[1])
        data = value.encode()
        request.raw_input_contents.append(len(data).to_bytes(4, "little") + data)
    return request


async def run_grpc_load(
    target: str,
    model: str,
    specs: Sequence[RequestSpec],
    *,
    concurrency: int = 32,
    channels: int = 1,
    timeout_s: float = 60.0,
) -> tuple[list[Result], float]:
    """Closed loop over gRPC (``target``: ``host:port``): ``concurrency`` clients, each
    sending its next ``ModelInfer`` when the previous one is answered, spread round-robin
    over ``channels`` channels, each its own TCP connection (separate client processes in
    production; one channel multiplexes every call on one HTTP/2 connection). Returns the results
    in spec order (``status`` 200 when answered, else 0 with the gRPC code as ``error``) and
    the wall time in seconds. No retries: a failed call is counted, not hidden."""
    import grpc

    requests = [grpc_request(model, s) for s in specs]  # built before the clock starts
    results: list[Result | None] = [None] * len(specs)
    async with ready_stubs(target, channels) as stubs:
        next_index = iter(range(len(specs)))
        t0 = time.perf_counter()

        async def client_loop(stub: Any) -> None:
            for i in next_index:  # shared iterator: each index is taken exactly once
                start = time.perf_counter()
                status, error = 200, None
                try:
                    await stub.ModelInfer(requests[i], timeout=timeout_s)
                except grpc.aio.AioRpcError as e:
                    status, error = 0, f"{e.code().name}: {e.details()}"
                end = time.perf_counter()
                results[i] = Result(specs[i].id, status, end - start, start - t0, 1, error)

        await asyncio.gather(*(client_loop(stubs[k % len(stubs)]) for k in range(concurrency)))
        wall = time.perf_counter() - t0
    return [r for r in results if r is not None], wall


def stream_slots(concurrency: int, streams: int) -> list[int]:
    """``concurrency`` requests in flight split over ``streams`` streams as evenly as can be
    (the first ones take the remainder), so a stream run keeps as many in flight as the
    unary clients of the same ``concurrency``."""
    streams = max(1, min(streams, concurrency))
    return [concurrency // streams + (1 if k < concurrency % streams else 0)
            for k in range(streams)]  # fmt: skip


async def run_grpc_stream_load(
    target: str,
    model: str,
    specs: Sequence[RequestSpec],
    *,
    concurrency: int = 32,
    streams: int = 4,
    channels: int = 1,
    timeout_s: float = 60.0,
) -> tuple[list[Result], float]:
    """Closed loop over ``ModelStreamInfer``: ``streams`` bidirectional streams (spread
    round-robin over ``channels`` channels), which keep ``concurrency`` requests in flight
    between them (:func:`stream_slots`), each sending its next request as soon as one of its
    own is answered. The same items as :func:`run_grpc_load`, one per request; answers come
    back out of order and are matched by the request's ``id`` (its index here). A request's
    latency runs from its write to its answer's read. Returns the results in spec order
    (``status`` 200 when answered, else 0 with the ``error_message``; a request left
    unanswered when its stream ends or fails is 0 too) and the wall time in seconds. Keep
    each stream's share at most the server's NLPSERVE_GRPC_STREAM_MAX_IN_FLIGHT (16): above
    it the server reads no further, and the surplus waits in flow control, timed all the same."""
    import grpc

    requests = [grpc_request(model, s) for s in specs]  # built before the clock starts
    for i, request in enumerate(requests):
        request.id = str(i)  # unique: the answer names it
    results: list[Result | None] = [None] * len(specs)
    async with ready_stubs(target, channels) as stubs:
        next_index = iter(range(len(specs)))
        t0 = time.perf_counter()

        async def one_stream(stub: Any, in_flight: int) -> None:
            call = stub.ModelStreamInfer()
            slots = asyncio.Semaphore(in_flight)
            sent: dict[str, float] = {}  # request id -> when written

            async def write() -> None:
                while True:
                    await slots.acquire()
                    i = next(next_index, None)  # shared: each index is taken exactly once
                    if i is None:
                        break
                    sent[str(i)] = time.perf_counter()
                    await call.write(requests[i])
                await call.done_writing()

            async def read() -> None:
                while True:
                    # no answer for timeout_s: as a unary call's deadline, the run fails
                    answer = await asyncio.wait_for(call.read(), timeout_s)
                    if answer is grpc.aio.EOF:
                        return
                    end = time.perf_counter()
                    rid = answer.infer_response.id
                    start, i = sent.pop(rid), int(rid)
                    error = answer.error_message or None
                    results[i] = Result(specs[i].id, 0 if error else 200, end - start,
                                        start - t0, 1, error)  # fmt: skip
                    slots.release()

            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(write())
                    group.create_task(read())
            # a write after the call ended raises InvalidStateError beside the read's error
            except* (grpc.aio.AioRpcError, TimeoutError, asyncio.InvalidStateError) as failed:
                # the stream failed or stalled: what it had not been answered fails
                call.cancel()
                now, why = time.perf_counter(), repr(failed.exceptions[0])
                for rid, start in sent.items():
                    i = int(rid)
                    results[i] = Result(specs[i].id, 0, now - start, start - t0, 1, why)

        shares = stream_slots(concurrency, streams)
        await asyncio.gather(*(one_stream(stubs[k % len(stubs)], n) for k, n in enumerate(shares)))
        wall = time.perf_counter() - t0
    return [r for r in results if r is not None], wall

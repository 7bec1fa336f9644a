"""The load generator's requests over the other protocols: REST V2 and gRPC ``ModelInfer``.

``bench.loadgen`` makes ``/v1`` requests (one item each). The same items, one per request,
become a V2 inference (``/v2/models/<model>/infer``, texts as a ``BYTES [1]`` tensor per
input) or a gRPC ``ModelInfer`` (the inputs in ``raw_input_contents``, each element a 4-byte
little-endian length and its bytes: tritonclient's way, so what a Triton client sends). Each
asks for every output, as a ``/v1`` answer carries every field. The gRPC client is a raw
``grpc.aio`` stub of the service's own generated modules over one channel by default (HTTP/2
multiplexes the calls; ``channels`` opens more), lighter than tritonclient's wrapper: the
benchmark measures the server, so the client should cost the shared cores as little as it
can. Needs the ``grpc`` extra.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from bench.loadgen import MODEL_TASKS, RequestSpec, Result

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

    from service.api.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

    requests = [grpc_request(model, s) for s in specs]  # built before the clock starts
    results: list[Result | None] = [None] * len(specs)
    # A local subchannel pool each: channels of one process to one target otherwise share
    # one connection.
    opened = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(max(1, channels))
    ]
    try:
        stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in opened]
        await asyncio.gather(*(c.channel_ready() for c in opened))
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
    finally:
        await asyncio.gather(*(c.close() for c in opened))
    return [r for r in results if r is not None], wall

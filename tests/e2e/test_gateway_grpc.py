"""The Open Inference Protocol over gRPC through the nginx gateway: the repository's own
``deploy/nginx/gateway.conf.template`` (its HTTP/2 cleartext listener, ``grpc_pass``) in
front of two ``nlpserve serve`` replicas with ``NLPSERVE_GRPC_PORT``, as processes on
loopback ports (compose's topology, in-process queue, the tiny polarity model).

Through the gateway tritonclient.grpc gets the answers a replica gives directly, both
replicas serve calls, a ModelStreamInfer stream passes through, the request id and
traceparent reach the replica as metadata, and what
nginx answers itself is a gRPC status a client can act on: RESOURCE_EXHAUSTED for its rate
limit and body limit, UNAVAILABLE (with a message) when no replica answers. One replica
down: the other serves every call. Needs ``nginx`` (Debian: ``nginx``, with http_v2).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import procs
from bench.loadgen import scrape_metrics
from tests.service_support import POLARITY_MODEL, require_model

grpc = pytest.importorskip("grpc", reason="the grpc extra is not installed")
tritongrpc = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is missing")

from service.api.grpc import grpc_predict_v2_pb2 as pb  # noqa: E402
from service.api.grpc import grpc_predict_v2_pb2_grpc as pb_grpc  # noqa: E402

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
        reason="needs nginx (Debian package nginx)",
    ),
]

TEXTS = ["A charming, funny and moving film.", "Dull, tedious and far too long.", "ok"]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
GATEWAY_MAX_BODY = 64 * 1024  # below the replicas' 1 MB: nginx's own refusal is seen


@dataclass
class GrpcTopology:
    gateway: str  # host:port of the gateway's gRPC listener
    grpc_ports: list[int]
    metrics: list[str]
    apis: list[procs.Proc]
    nginx: procs.Proc


@pytest.fixture
def topology(model_repo: Path, tmp_path: Path) -> Iterator[GrpcTopology]:
    require_model(model_repo, POLARITY_MODEL)
    started: list[procs.Proc] = []
    with procs.stopping(started):
        apis, http_ports, grpc_ports = [], [], []
        for i in range(2):
            http_port, grpc_port = procs.free_port(), procs.free_port()
            env = {
                "NLPSERVE_MODEL_DIR": str(model_repo),
                "NLPSERVE_LOAD_MODELS": POLARITY_MODEL,
                "NLPSERVE_PROVIDERS": "CPUExecutionProvider",
                "NLPSERVE_VARIANT": "fp32",  # answers that do not move with batch-mates
                "NLPSERVE_INTRA_OP_THREADS": "1",
                "NLPSERVE_HOST": "127.0.0.1",
                "NLPSERVE_PORT": str(http_port),
                "NLPSERVE_GRPC_PORT": str(grpc_port),
                "NLPSERVE_LOG_LEVEL": "WARNING",
                "TOKENIZERS_PARALLELISM": "false",
            }
            api = procs.start(f"api{i}", [procs.nlpserve_bin(), "serve"], tmp_path / "logs", env)
            started.append(api)
            apis.append(api)
            http_ports.append(http_port)
            grpc_ports.append(grpc_port)
        for api, port in zip(apis, http_ports, strict=True):
            procs.wait_http(api, f"http://127.0.0.1:{port}/readyz", timeout_s=90)
        gport = procs.free_port()
        # Same server parameters as compose's NLPSERVE_GRPC_UPSTREAMS.
        upstreams = " ".join(
            f"server 127.0.0.1:{port} max_fails=3 fail_timeout=5s;" for port in grpc_ports
        )
        nginx = procs.start_nginx(
            tmp_path / "nginx",
            {
                "NLPSERVE_UPSTREAMS": f"server 127.0.0.1:{http_ports[0]};",
                "NLPSERVE_GATEWAY_PORT": str(procs.free_port()),
                "NLPSERVE_RATE_LIMIT": "100000",  # the limit has its own test below
                "NLPSERVE_MAX_BODY": str(GATEWAY_MAX_BODY),
                "NLPSERVE_GRPC_UPSTREAMS": upstreams,
                "NLPSERVE_GATEWAY_GRPC_PORT": str(gport),
            },
        )
        started.append(nginx)
        metrics = [f"http://127.0.0.1:{p}/metrics" for p in http_ports]
        yield GrpcTopology(f"127.0.0.1:{gport}", grpc_ports, metrics, apis, nginx)


def _request(texts: list[str]) -> pb.ModelInferRequest:
    """A ModelInferRequest of ``texts`` as BYTES contents (the raw stub's way)."""
    tensor = pb.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES")
    tensor.shape.append(len(texts))
    tensor.contents.bytes_contents.extend(t.encode() for t in texts)
    return pb.ModelInferRequest(model_name=POLARITY_MODEL, inputs=[tensor])


def _triton_infer(address: str) -> dict[str, np.ndarray]:
    client = tritongrpc.InferenceServerClient(address)
    try:
        tensor = tritongrpc.InferInput("text", [len(TEXTS)], "BYTES")
        tensor.set_data_from_numpy(np.array(TEXTS, dtype=object))
        result = client.infer(POLARITY_MODEL, [tensor], timeout=20)
        return {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}
    finally:
        client.close()


def _grpc_calls(metrics_url: str) -> float:
    samples = scrape_metrics([metrics_url])
    return sum(
        v
        for (name, labels), v in samples.items()
        if name == "nlpserve_requests_total" and dict(labels).get("endpoint") == "grpc"
    )


def test_grpc_through_the_gateway(topology: GrpcTopology) -> None:
    # tritonclient through the gateway: the answer a replica gives directly.
    direct = _triton_infer(f"127.0.0.1:{topology.grpc_ports[0]}")
    via = _triton_infer(topology.gateway)
    assert direct.keys() == via.keys() and direct
    for name in direct:
        if direct[name].dtype.kind == "f":
            np.testing.assert_allclose(via[name], direct[name], rtol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(via[name], direct[name], err_msg=name)

    with grpc.insecure_channel(topology.gateway) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        # One client connection, calls balanced over both replicas.
        before = [_grpc_calls(m) for m in topology.metrics]
        for _ in range(20):
            stub.ModelInfer(_request(["good"]), timeout=20)
        served = [_grpc_calls(m) - b for m, b in zip(topology.metrics, before, strict=True)]
        assert sum(served) == 20 and min(served) >= 1, served

        # The caller's request id reaches the replica, which echoes the id it used in its
        # trailers; the gateway sends it back too; traceparent passes unchanged.
        sent = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
        _, call = stub.ModelInfer.with_call(
            _request(["good"]),
            metadata=[("x-request-id", "e2e-grpc-1"), ("traceparent", sent)],
            timeout=20,
        )
        trailing, initial = dict(call.trailing_metadata()), dict(call.initial_metadata())
        assert trailing["x-request-id"] == "e2e-grpc-1" == initial["x-request-id"]
        assert trailing["traceparent"].startswith(f"00-{TRACE_ID}-")
        # An id the API would refuse: the gateway mints one and the replica uses that one.
        _, call = stub.ModelInfer.with_call(
            _request(["good"]), metadata=[("x-request-id", "a b")], timeout=20
        )
        minted = dict(call.initial_metadata())["x-request-id"]
        assert len(minted) == 32 and dict(call.trailing_metadata())["x-request-id"] == minted

        # A replica's own refusal comes through as its status and message.
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(pb.ModelInferRequest(model_name="no-such-model"), timeout=20)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value
        # A message over the gateway's body limit: nginx's refusal, as RESOURCE_EXHAUSTED.
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(_request(["x" * (2 * GATEWAY_MAX_BODY)]), timeout=20)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
        assert "gateway limit" in (err.value.details() or "")

        # A ModelStreamInfer stream passes through (HTTP/2 both ways): every request answered
        # on it with its id, a refused one as its error_message, the stream going on.
        requests = [_request(TEXTS[: 1 + k % 3]) for k in range(6)]
        bad = _request(["good"])
        bad.inputs[0].name = "txt"
        for k, request in enumerate([*requests, bad]):
            request.id = f"g-{k}"
        answers = list(stub.ModelStreamInfer(iter([*requests, bad]), timeout=30))
        by_id = {a.infer_response.id: a for a in answers}
        assert len(answers) == 7 and set(by_id) == {f"g-{k}" for k in range(7)}
        assert by_id["g-6"].error_message.startswith("INVALID_ARGUMENT: unknown input 'txt'")
        for k in range(6):
            assert by_id[f"g-{k}"].error_message == ""
            label = next(o for o in by_id[f"g-{k}"].infer_response.outputs if o.name == "label")
            assert list(label.shape) == [1 + k % 3]

        # One replica down: the other serves every call (nginx retries a refused connection).
        topology.apis[0].kill()
        before_survivor = _grpc_calls(topology.metrics[1])
        for _ in range(10):
            stub.ModelInfer(_request(["good"]), timeout=20)
        assert _grpc_calls(topology.metrics[1]) - before_survivor == 10

        # None left: UNAVAILABLE with the gateway's message, which clients retry.
        topology.apis[1].kill()
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(_request(["good"]), metadata=[("x-request-id", "e2e-down")])
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
        assert err.value.details() == "no API replica answered at the gateway; retry after 1 s"
        # nginx's answer is headers only ("Trailers-Only"): its metadata is the trailers
        assert dict(err.value.trailing_metadata())["x-request-id"] == "e2e-down"
    log = topology.nginx.log_path.read_text()
    assert "rid=e2e-grpc-1 " in log and "grpc_status=14 rid=e2e-down " in log, log[-2000:]


def test_grpc_rate_limit_is_resource_exhausted(tmp_path: Path) -> None:
    """REST's per-client limit applies to gRPC calls too, answered as RESOURCE_EXHAUSTED
    (with nothing behind the gateway the calls let through are UNAVAILABLE)."""
    gport = procs.free_port()
    nginx = procs.start_nginx(
        tmp_path,
        {
            "NLPSERVE_UPSTREAMS": f"server 127.0.0.1:{procs.free_port()};",
            "NLPSERVE_GATEWAY_PORT": str(procs.free_port()),
            "NLPSERVE_RATE_LIMIT": "1",
            "NLPSERVE_MAX_BODY": "1k",
            "NLPSERVE_GRPC_UPSTREAMS": f"server 127.0.0.1:{procs.free_port()};",
            "NLPSERVE_GATEWAY_GRPC_PORT": str(gport),
        },
    )
    with procs.stopping([nginx]), grpc.insecure_channel(f"127.0.0.1:{gport}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        errors: list[Any] = []  # grpc.RpcError (grpc is imported by importorskip)
        for _ in range(260):  # 1 r/s with a burst of 200: a quick flood must be limited
            try:
                stub.ModelInfer(_request(["good"]), timeout=5)
            except grpc.RpcError as e:
                errors.append(e)
        codes = {e.code() for e in errors}
        assert codes == {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        limited = [e for e in errors if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert len(limited) >= 30, len(limited)
        assert (limited[0].details() or "").startswith("over 1 requests/s from this address")
        assert dict(limited[0].trailing_metadata())["retry-after"] == "1"
        # Not a method of the service: UNIMPLEMENTED, as a gRPC server would answer.
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary("/other.Service/Call")(b"", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED, err.value

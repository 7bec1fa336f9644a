"""The Open Inference Protocol over gRPC (NLPSERVE_GRPC_PORT), called by tritonclient.grpc
(its asyncio client: the server runs on the test's event loop) and by a raw stub, against a
real server on a free port with the tiny trained models: the answers REST /v2 gives for the
same input, REST's refusals as gRPC codes with the same messages, deadlines, keys, Redis."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio

from service import __version__
from service.api.app import create_app  # noqa: E402
from tests.api.test_errors import LIMITS
from tests.api.test_v2 import MODELS, QA_PAIRS, V1_TEXTS, infer_body
from tests.redis_support import free_port, redis_backend
from tests.service_support import (
    DETECT_MODEL,
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
from tritonclient.grpc import InferInput, InferRequestedOutput  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from service.api.grpc import grpc_predict_v2_pb2 as pb  # noqa: E402
from service.api.grpc import grpc_predict_v2_pb2_grpc as pb_grpc  # noqa: E402

pytestmark = pytest.mark.asyncio(loop_scope="session")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _all_models(model_repo):
    for name in MODELS:
        require_model(model_repo, name)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def srv(model_repo):
    """fp32 (answers that do not move with batch-mates) under /v1's error tests' limits."""
    settings = make_settings(model_repo, variant="fp32", grpc_port=free_port(), **LIMITS)
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


def inputs_of(model: str, n: int) -> list[InferInput]:
    """tritonclient's inputs of the first ``n`` texts (QA: pairs) of ``model``'s task, sent
    as it sends them by default (raw_input_contents)."""
    if model == QA_MODEL:
        columns = {
            "question": [q for q, _ in QA_PAIRS[:n]],
            "context": [c for _, c in QA_PAIRS[:n]],
        }
    else:
        columns = {"text": V1_TEXTS[model][:n]}
    inputs = []
    for name, values in columns.items():
        tensor = InferInput(name, [len(values)], "BYTES")
        tensor.set_data_from_numpy(np.array(values, dtype=object))
        inputs.append(tensor)
    return inputs


def as_rest(result: Any, names: list[str]) -> dict[str, dict[str, Any]]:
    """tritonclient's answer in REST /v2's shape: name -> {datatype, shape, data (flat)}."""
    out = {}
    for name in names:
        array = result.as_numpy(name)
        tensor = result.get_output(name)
        data = array.reshape(-1).tolist()
        if tensor.datatype == "BYTES":
            data = [v.decode("utf-8") for v in data]
        out[name] = {"datatype": tensor.datatype, "shape": list(tensor.shape), "data": data}
    return out


def rest_outputs(answer: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {o.pop("name"): o for o in answer["outputs"]}


def close(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name]["datatype"], a[name]["shape"]) == (b[name]["datatype"], b[name]["shape"])
        if a[name]["datatype"] == "FP32":  # float32 on the wire, JSON's double in REST
            assert a[name]["data"] == pytest.approx(b[name]["data"], rel=1e-6), name
        else:
            assert a[name]["data"] == b[name]["data"], name


# ------------------------------------------------------------------ answers
@pytest.mark.parametrize("model", MODELS)
async def test_tritonclient_infers_each_model_as_rest_v2_answers(srv, triton, model):
    n = 2
    result = await triton.infer(model, inputs_of(model, n), request_id="r-1")
    response = result.get_response()
    task = srv.state.tasks[model]
    assert (response.model_name, response.model_version, response.id) == (
        model,
        task.manifest.version,
        "r-1",
    )
    async with srv.client() as c:
        r = await c.post(f"/v2/models/{model}/infer", json=infer_body(model, n))
    assert r.status_code == 200, r.text
    rest = rest_outputs(r.json())
    close(as_rest(result, list(rest)), rest)
    if model in (DETECT_MODEL, POLARITY_MODEL):
        assert result.as_numpy("probabilities").shape == (n, len(task.manifest.labels))
        assert result.as_numpy("truncated").dtype == np.bool_


async def test_a_raw_stub_with_bytes_contents_and_an_outputs_filter(srv):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.settings.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name=POS_MODEL, id="x")
        tensor = request.inputs.add(name="text", datatype="BYTES", shape=[2])
        tensor.contents.bytes_contents.extend(t.encode() for t in V1_TEXTS[POS_MODEL][:2])
        request.outputs.add(name="tags")
        response = await stub.ModelInfer(request, timeout=20)
    assert [o.name for o in response.outputs] == ["tags"] and response.id == "x"
    assert list(response.outputs[0].shape) == [2]
    raw = response.raw_output_contents[0]
    tags = []
    while raw:
        n = int.from_bytes(raw[:4], "little")
        tags.append(json.loads(raw[4 : 4 + n]))
        raw = raw[4 + n :]
    async with srv.client() as c:
        r = await c.post("/v1/pos", json={"inputs": [{"text": t} for t in V1_TEXTS[POS_MODEL][:2]]})
    assert tags == [o["tags"] for o in r.json()["outputs"]]


async def test_health_and_metadata(srv, triton):
    assert await triton.is_server_live()
    assert await triton.is_server_ready()
    meta = await triton.get_server_metadata()
    assert (meta.name, meta.version, list(meta.extensions)) == ("nlpserve", __version__, [])
    async with srv.client() as c:
        for model in MODELS:
            assert await triton.is_model_ready(model)
            version = srv.state.tasks[model].manifest.version
            assert await triton.is_model_ready(model, version)
            got = await triton.get_model_metadata(model, as_json=True)
            rest = (await c.get(f"/v2/models/{model}")).json()
            for tensor in rest["inputs"] + rest["outputs"]:
                tensor.pop("parameters", None)  # no parameters in the gRPC TensorMetadata
                tensor["shape"] = [str(d) for d in tensor["shape"]]  # int64 in proto JSON
            assert got == rest
    with pytest.raises(InferenceServerException) as e:
        await triton.is_model_ready(POS_MODEL, "99")
    assert e.value.status() == "StatusCode.NOT_FOUND"
    assert "is not served at version '99'" in e.value.message()


# ------------------------------------------------------------------ errors
def _text(name: str, values: list[str], datatype: str = "BYTES", shape=None) -> InferInput:
    tensor = InferInput(name, shape or [len(values)], datatype)
    if datatype == "BYTES":
        tensor.set_data_from_numpy(np.array(values, dtype=object).reshape(shape or [len(values)]))
    else:
        tensor.set_data_from_numpy(np.zeros(shape or [len(values)], dtype=np.float32))
    return tensor


BAD = [
    ("nope", [_text("text", ["a"])], "NOT_FOUND", "no model named 'nope' is loaded"),
    (POLARITY_MODEL, [_text("txt", ["a"])], "INVALID_ARGUMENT", "unknown input 'txt'"),
    (
        POLARITY_MODEL,
        [_text("text", ["a"], "FP32")],
        "INVALID_ARGUMENT",
        "input 'text' has datatype 'FP32'; text inputs are BYTES",
    ),
    (
        POLARITY_MODEL,
        [_text("text", ["a", "b"], shape=[1, 2])],
        "INVALID_ARGUMENT",
        "input 'text' has shape [1, 2]; text inputs have shape [N]",
    ),
    (POLARITY_MODEL, [_text("text", [])], "INVALID_ARGUMENT", "holds no text (shape [0])"),
    (POLARITY_MODEL, [_text("text", ["a", "b" * 301])], "INVALID_ARGUMENT", "text[1] has 301"),
    (POLARITY_MODEL, [_text("text", ["a"] * 4)], "INVALID_ARGUMENT", "4 texts (shape [4])"),
    (POLARITY_MODEL, [_text("text", [" "])], "INVALID_ARGUMENT", "text[0]: must contain some"),
    (POLARITY_MODEL, [_text("text", ["a" * 5000])], "RESOURCE_EXHAUSTED", ""),
]


@pytest.mark.parametrize("model, inputs, code, message", BAD)
async def test_bad_requests_get_rests_message_as_a_grpc_code(triton, model, inputs, code, message):
    with pytest.raises(InferenceServerException) as e:
        await triton.infer(model, inputs)
    assert e.value.status() == f"StatusCode.{code}"
    assert message in e.value.message()


async def test_unknown_output_and_malformed_raw_contents(srv, triton):
    with pytest.raises(InferenceServerException) as e:
        await triton.infer(
            POLARITY_MODEL, [_text("text", ["a"])], outputs=[InferRequestedOutput("score")]
        )
    assert "unknown output 'score'" in e.value.message()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.settings.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name=POLARITY_MODEL)
        request.inputs.add(name="text", datatype="BYTES", shape=[1])
        request.raw_input_contents.append((9).to_bytes(4, "little") + b"short")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ModelInfer(request, timeout=20)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "element 0 says 9 bytes but 5 remain" in (err.value.details() or "")
        request.raw_input_contents[0] = (2).to_bytes(4, "little") + b"\xff\xfe"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ModelInfer(request, timeout=20)
        assert "element 0 is not UTF-8 text" in (err.value.details() or "")


async def test_call_deadline_is_the_requests_deadline_and_the_item_never_runs(srv, triton):
    q = srv.queue
    q.pause()
    ran_before = len(q.batch_log)
    before = await _metrics(srv)
    with pytest.raises(InferenceServerException) as e:
        await triton.infer(POLARITY_MODEL, inputs_of(POLARITY_MODEL, 1), client_timeout=0.3)
    assert e.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    await wait_for(lambda: q.waiting == 0)  # withdrawn, as an HTTP request past its deadline
    q.resume()
    await wait_for(lambda: q.depth(POLARITY_MODEL) == 0)
    assert len(q.batch_log) == ran_before
    after = await _metrics(srv)
    series = dict(model=POLARITY_MODEL, endpoint="grpc", status="504")
    assert metric_value(after, "nlpserve_requests_total", **series) == (
        metric_value(before, "nlpserve_requests_total", **series) + 1
    )


async def test_a_full_queue_is_resource_exhausted_with_retry_after(srv, triton):
    q = srv.queue
    q.pause()
    held = [
        asyncio.create_task(triton.infer(POLARITY_MODEL, inputs_of(POLARITY_MODEL, 1)))
        for _ in range(3)  # LIMITS' max_queue_depth
    ]
    await wait_for(lambda: q.depth(POLARITY_MODEL) == 3)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.settings.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name=POLARITY_MODEL)
        tensor = request.inputs.add(name="text", datatype="BYTES", shape=[1])
        tensor.contents.bytes_contents.append(b"a film")
        call = stub.ModelInfer(request, timeout=20)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry later" in (err.value.details() or "")
    trailing = dict(err.value.trailing_metadata() or ())
    assert int(trailing["retry-after"]) >= 1
    q.resume()
    for t in held:
        assert (await t).as_numpy("label").shape == (1,)


async def test_answers_are_counted_with_the_grpc_endpoint(srv, triton):
    before = await _metrics(srv)
    await triton.infer(POS_MODEL, inputs_of(POS_MODEL, 1))
    await triton.infer(POLARITY_MODEL, inputs_of(POLARITY_MODEL, 2))
    after = await _metrics(srv)
    series = dict(model=POS_MODEL, endpoint="grpc", status="200")
    for name in ("nlpserve_requests_total", "nlpserve_request_duration_seconds_count"):
        assert metric_value(after, name, **series) == metric_value(before, name, **series) + 1
    # and so are their items, in the prediction and input series
    for name, model, moved in (
        ("nlpserve_predictions_total", POLARITY_MODEL, 2),
        ("nlpserve_prediction_confidence_count", POLARITY_MODEL, 2),
        ("nlpserve_input_tokens_count", POS_MODEL, 1),
    ):
        got = metric_value(after, name, model=model) - metric_value(before, name, model=model)
        assert got == moved, name
    stage = "nlpserve_request_stage_seconds_count"
    assert metric_value(after, stage, model=POS_MODEL) > metric_value(
        before, stage, model=POS_MODEL
    )


async def _metrics(srv) -> str:
    async with srv.client() as c:
        return await read_metrics(c)


# ------------------------------------------------------------------ keys, Redis
async def test_api_keys_guard_all_but_the_health_rpcs(model_repo, tmp_path: Path):
    keys = tmp_path / "keys"
    key = "k" * 32
    keys.write_text(f"tester {key}\n")
    settings = make_settings(model_repo, grpc_port=free_port(), api_keys_file=keys)
    async with live_server(settings):
        client = tc.InferenceServerClient(f"127.0.0.1:{settings.grpc_port}")
        try:
            assert await client.is_server_live() and await client.is_server_ready()
            for call in (
                client.is_model_ready(POS_MODEL),  # names what is loaded, as REST's needs a key
                client.get_server_metadata(),
                client.get_model_metadata(POS_MODEL),
                client.infer(POS_MODEL, inputs_of(POS_MODEL, 1)),
                client.infer(POS_MODEL, inputs_of(POS_MODEL, 1), headers={"x-api-key": "no"}),
            ):
                with pytest.raises(InferenceServerException) as e:
                    await call
                assert e.value.status() == "StatusCode.UNAUTHENTICATED"
                assert "API key" in e.value.message()
            for headers in ({"authorization": f"Bearer {key}"}, {"x-api-key": key}):
                assert await client.is_model_ready(POS_MODEL, headers=headers)
                result = await client.infer(POS_MODEL, inputs_of(POS_MODEL, 1), headers=headers)
                assert result.as_numpy("tags").shape == (1,)
        finally:
            await client.close()


async def test_a_clients_in_flight_limit_covers_its_grpc_calls(model_repo, tmp_path: Path):
    """NLPSERVE_CLIENT_MAX_IN_FLIGHT counts a client's gRPC items with its HTTP ones: at its
    limit it gets RESOURCE_EXHAUSTED client_quota, while another client is still admitted."""
    keys = tmp_path / "keys"
    alice, bob = "a" * 32, "b" * 32
    keys.write_text(f"alice {alice}\nbob {bob}\n")
    settings = make_settings(
        model_repo, grpc_port=free_port(), api_keys_file=keys, client_max_in_flight=2
    )
    async with live_server(settings) as s:
        client = tc.InferenceServerClient(f"127.0.0.1:{settings.grpc_port}")
        try:
            s.queue.pause()
            as_alice, as_bob = {"x-api-key": alice}, {"x-api-key": bob}
            held = asyncio.create_task(  # 2 items: alice's whole allowance
                client.infer(POLARITY_MODEL, inputs_of(POLARITY_MODEL, 2), headers=as_alice)
            )
            await wait_for(lambda: s.queue.depth(POLARITY_MODEL) == 2)
            with pytest.raises(InferenceServerException) as e:
                await client.infer(POLARITY_MODEL, inputs_of(POLARITY_MODEL, 1), headers=as_alice)
            assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
            assert "NLPSERVE_CLIENT_MAX_IN_FLIGHT" in e.value.message()
            served = asyncio.create_task(
                client.infer(POLARITY_MODEL, inputs_of(POLARITY_MODEL, 1), headers=as_bob)
            )
            await wait_for(lambda: s.queue.depth(POLARITY_MODEL) == 3)
            s.queue.resume()
            assert (await held).as_numpy("label").shape == (2,)
            assert (await served).as_numpy("label").shape == (1,)
            # released once answered: alice is admitted again
            again = await client.infer(
                POLARITY_MODEL, inputs_of(POLARITY_MODEL, 2), headers=as_alice
            )
            assert again.as_numpy("label").shape == (2,)
        finally:
            s.queue.resume()
            await client.close()


async def test_a_clients_own_max_in_flight_covers_its_grpc_calls(model_repo, tmp_path: Path):
    """The keys file's max_in_flight=N is the client's limit over gRPC too (above the
    default here), and a reload that lowers it applies to the next call."""
    keys = tmp_path / "keys"
    alice, bulk = "a" * 32, "b" * 32
    keys.write_text(f"alice {alice}\nbulk {bulk} max_in_flight=3\n")
    settings = make_settings(
        model_repo, grpc_port=free_port(), api_keys_file=keys, client_max_in_flight=1
    )
    async with live_server(settings) as s:
        client = tc.InferenceServerClient(f"127.0.0.1:{settings.grpc_port}")
        api_keys = s.state.api_keys
        assert api_keys is not None
        as_alice, as_bulk = {"x-api-key": alice}, {"x-api-key": bulk}

        async def refused(n: int, headers: dict[str, str], status: str) -> str:
            with pytest.raises(InferenceServerException) as e:
                await client.infer(POLARITY_MODEL, inputs_of(POLARITY_MODEL, n), headers=headers)
            assert e.value.status() == f"StatusCode.{status}"
            return e.value.message()

        try:
            s.queue.pause()
            held = [  # 3 items: over the default, within bulk's own limit
                asyncio.create_task(
                    client.infer(POLARITY_MODEL, inputs_of(POLARITY_MODEL, n), headers=as_bulk)
                )
                for n in (2, 1)
            ]
            await wait_for(lambda: s.queue.depth(POLARITY_MODEL) == 3)
            message = await refused(1, as_bulk, "RESOURCE_EXHAUSTED")
            assert "the limit for this client is 3 (this client's max_in_flight" in message
            held.append(
                asyncio.create_task(
                    client.infer(POLARITY_MODEL, inputs_of(POLARITY_MODEL, 1), headers=as_alice)
                )
            )
            await wait_for(lambda: s.queue.depth(POLARITY_MODEL) == 4)
            message = await refused(1, as_alice, "RESOURCE_EXHAUSTED")  # the default: 1
            assert "NLPSERVE_CLIENT_MAX_IN_FLIGHT" in message
            s.queue.resume()
            assert [(await t).as_numpy("label").shape for t in held] == [(2,), (1,), (1,)]

            keys.write_text(f"alice {alice}\nbulk {bulk} max_in_flight=1\n")
            assert api_keys.reload()
            message = await refused(2, as_bulk, "INVALID_ARGUMENT")  # 2 > 1: never admitted
            assert "at most 1 in flight (this client's max_in_flight" in message
        finally:
            s.queue.resume()
            await client.close()


async def test_the_response_cache_answers_a_repeated_grpc_call(model_repo):
    """gRPC goes down run_work like HTTP: with NLPSERVE_RESPONSE_CACHE_MB a repeated item is
    answered from the cache, the same as when it ran."""
    settings = make_settings(model_repo, variant="fp32", grpc_port=free_port(), response_cache_mb=1)
    async with live_server(settings) as s:
        client = tc.InferenceServerClient(f"127.0.0.1:{settings.grpc_port}")
        try:
            first = await client.infer(POS_MODEL, inputs_of(POS_MODEL, 1))
            async with s.client() as c:
                before = await read_metrics(c)
            second = await client.infer(POS_MODEL, inputs_of(POS_MODEL, 1))
            async with s.client() as c:
                after = await read_metrics(c)
        finally:
            await client.close()
    assert as_rest(second, ["tokens", "tags"]) == as_rest(first, ["tokens", "tags"])
    hits = "nlpserve_response_cache_hits_total"
    assert metric_value(after, hits, model=POS_MODEL) == (
        metric_value(before, hits, model=POS_MODEL) + 1
    )


async def test_traceparent_joins_the_callers_trace(srv):
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.settings.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name=POS_MODEL)
        request.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
            b"The dog barks."
        )
        call = stub.ModelInfer(
            request, timeout=20, metadata=(("traceparent", f"00-{trace_id}-00f067aa0ba902b7-01"),)
        )
        await call
        trailing = dict(await call.trailing_metadata())
    assert trailing["traceparent"].startswith(f"00-{trace_id}-")
    assert trailing["x-request-id"]


async def test_redis_mode_serves_an_inference(model_repo):
    settings = make_settings(model_repo, grpc_port=free_port())
    async with redis_backend(settings) as s, live_server(s):
        client = tc.InferenceServerClient(f"127.0.0.1:{settings.grpc_port}")
        try:
            result = await client.infer(POLARITY_MODEL, inputs_of(POLARITY_MODEL, 1))
        finally:
            await client.close()
    assert result.as_numpy("label").tolist()[0].decode() in ("positive", "negative")


async def test_grpcio_is_not_imported_with_grpc_off(model_repo):
    """grpcio is an optional extra: the app, its server and the CLI run without it."""
    code = (
        "import sys; sys.modules['grpc'] = None\n"  # an import of it would fail
        "import service.cli, service.server\n"
        "from service.api.app import create_app\n"
        "from tests.service_support import make_settings\n"
        f"create_app(make_settings({str(model_repo)!r}))\n"
        "assert not any(m.startswith('service.api.grpc') for m in sys.modules)\n"
    )
    run = [sys.executable, "-c", code]
    await asyncio.to_thread(subprocess.run, run, cwd=ROOT, check=True, timeout=120)


async def test_serve_without_grpcio_says_so_in_one_line(model_repo, tmp_path: Path):
    code = (
        "import sys; sys.modules['grpc'] = None\n"  # an import of it fails, as uninstalled
        "from service.cli import main\n"
        f"sys.argv = ['nlpserve', 'serve', '--models', {str(model_repo)!r}, '--port', '0']\n"
        "main()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("NLPSERVE_")}
    env.update(NLPSERVE_GRPC_PORT=str(free_port()), PYTHONPATH=str(ROOT))
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "NLPSERVE_GRPC_PORT" in lines[0] and "nlpserve[grpc]" in lines[0]


async def test_the_generated_modules_are_current(tmp_path: Path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools is not installed")
    from importlib.metadata import version

    from service.api.grpc import generate

    made_by = re.search(
        r"GRPC_GENERATED_VERSION = '([^']+)'",
        (generate.PROTO.parent / "grpc_predict_v2_pb2_grpc.py").read_text(),
    )
    assert made_by is not None
    if version("grpcio-tools") != made_by.group(1):  # another protoc writes other text
        pytest.skip(f"the stubs were made by grpcio-tools {made_by.group(1)}")

    texts = await asyncio.to_thread(generate.generate, tmp_path)
    for name, text in texts.items():
        assert (generate.PROTO.parent / name).read_text() == text, f"{name}: make grpc-stubs"


async def test_shutdown_answers_the_call_in_flight_and_refuses_new_ones(model_repo):
    settings = make_settings(model_repo, grpc_port=free_port())
    srv = await LiveServer(create_app(settings), settings).start()
    client = tc.InferenceServerClient(f"127.0.0.1:{settings.grpc_port}")
    try:
        q = srv.queue
        q.pause()
        held = asyncio.create_task(client.infer(POS_MODEL, inputs_of(POS_MODEL, 1)))
        await wait_for(lambda: q.depth(POS_MODEL) == 1)
        stopping = asyncio.create_task(srv.stop())
        await wait_for(lambda: srv.state.stopping)
        with pytest.raises(InferenceServerException) as e:
            await client.infer(POS_MODEL, inputs_of(POS_MODEL, 1))
        # the port is closed, or the call is refused ("the service is shutting down")
        assert e.value.status() == "StatusCode.UNAVAILABLE"
        q.resume()
        assert (await held).as_numpy("tags").shape == (1,)  # drained, answered
        await stopping
    finally:
        await client.close()


async def test_a_grpc_port_in_use_is_one_line_with_exit_status_2(model_repo):
    """Another process on NLPSERVE_GRPC_PORT: `nlpserve serve` ends with one line naming
    the setting and the address, exit status 2 (it was uvicorn's traceback of the lifespan)."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    where = f"127.0.0.1:{holder.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NLPSERVE_")}
    env.update(
        PYTHONPATH=str(ROOT),
        NLPSERVE_GRPC_PORT=str(holder.getsockname()[1]),
        NLPSERVE_PORT=str(free_port()),
        NLPSERVE_LOAD_MODELS=POLARITY_MODEL,
        NLPSERVE_INTRA_OP_THREADS="1",
    )
    try:
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "service.cli", "serve", "--models", str(model_repo)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        holder.close()
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(f"nlpserve: cannot serve gRPC: NLPSERVE_GRPC_PORT: {where} ")
    assert lines[-1].endswith("(Address already in use)"), lines[-1]
    # not grpcio's own error line first (its C core's: "E1207 12:00:00.000 ... add_port.cc")
    assert not any(re.match(r"[EWI]\d{4} ", line) for line in lines), done.stderr
    assert "add_port" not in done.stderr, done.stderr


async def test_sigterm_stops_both_servers_of_a_real_process(model_repo):
    """`nlpserve serve` with gRPC on answers both protocols, and SIGTERM ends it cleanly:
    both ports closed, a clean exit, no traceback."""
    grpc_port, http_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NLPSERVE_")}
    env.update(
        PYTHONPATH=str(ROOT),
        NLPSERVE_GRPC_PORT=str(grpc_port),
        NLPSERVE_PORT=str(http_port),
        NLPSERVE_LOAD_MODELS=POLARITY_MODEL,
        NLPSERVE_INTRA_OP_THREADS="1",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--models", str(model_repo)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    client = tc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    try:
        for _ in range(300):
            if proc.poll() is not None:
                raise AssertionError(proc.communicate()[0])
            try:
                if await client.is_server_ready():
                    break
            except InferenceServerException:
                pass
            await asyncio.sleep(0.2)
        result = await client.infer(POLARITY_MODEL, inputs_of(POLARITY_MODEL, 1))
        assert result.as_numpy("label").shape == (1,)
        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.to_thread(proc.communicate, timeout=30)
    finally:
        await client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Application shutdown complete" in out and "Traceback" not in out, out
    for port in (grpc_port, http_port):  # both released
        with socket.socket() as s:
            # a closed connection's TIME_WAIT is not a listener: without SO_REUSEADDR the
            # bind failed on it now and then (EADDRINUSE); with it, only a listener refuses
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))


async def test_a_test_servers_failed_startup_fails_only_its_test(model_repo):
    """uvicorn ends a failed startup with SystemExit, which asyncio lets out of the event
    loop, ending the whole test session with no summary: LiveServer.start raises the
    startup's own error instead (here: the gRPC port taken)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        settings = make_settings(model_repo, load_models=POS_MODEL, grpc_port=port)
        with pytest.raises(RuntimeError, match="startup failed: .*NLPSERVE_GRPC_PORT"):
            await LiveServer(create_app(settings), settings).start()


async def test_a_test_servers_grpc_port_is_held_until_it_listens(model_repo):
    """free_port()'s gRPC port is bound seconds later, once the models load: LiveServer
    holds it meanwhile, so another test process's bind cannot take it and fail the
    startup; the server's own bind still succeeds."""
    settings = make_settings(model_repo, load_models=POS_MODEL, grpc_port=free_port())
    srv = LiveServer(create_app(settings), settings)
    try:
        with socket.socket() as other, pytest.raises(OSError):  # another process, meanwhile
            other.bind(("127.0.0.1", settings.grpc_port))
        await srv.start()
        client = tc.InferenceServerClient(f"127.0.0.1:{settings.grpc_port}")
        try:
            assert await client.is_server_live()
        finally:
            await client.close()
    finally:
        await srv.stop()

"""The Open Inference Protocol (KServe V2) over gRPC (``NLPSERVE_GRPC_PORT``): Triton's and
KServe's ``inference.GRPCInferenceService``, as far as grpc_predict_v2.proto here declares it
(health, metadata, ModelInfer) and of Triton's the bidirectional ModelStreamInfer and
RepositoryIndex, for tritonclient.grpc and KServe's clients.

A ``grpc.aio`` server on the API's own event loop (started and stopped by its lifespan,
service/api/app.py): an inference goes down the REST /v2's path (``v2_tensors.infer`` over
``run_work``: the same tensors, checks, queue, batching, deadline and stage metrics), its
protobuf tensors read into the REST request model and its answer written as raw tensors.
Each request of a ModelStreamInfer stream goes the same way, several at once.
Errors are the REST status's gRPC code (:data:`CODES`) with REST's message.

Imported only where gRPC is on: grpcio is an optional extra.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import socket
import time
from collections.abc import Sequence
from typing import Any, NoReturn

import grpc
import numpy as np
from grpc import aio
from pydantic import ValidationError

import service
from service import tracecontext
from service.api.auth import authenticate, still_held
from service.api.deps import ServiceState, lane_for, priority_class
from service.api.errors import ApiError, retry_after_header, validation_error
from service.api.grpc import GrpcPortError
from service.api.grpc import grpc_predict_v2_pb2 as pb
from service.api.grpc import grpc_predict_v2_pb2_grpc as pb_grpc
from service.api.routes.ops import not_ready
from service.api.routes.predict import run_work
from service.api.v2_schemas import V2InferenceRequest
from service.api.v2_tensors import (
    PLATFORM,
    TEXT_DATATYPE,
    find_model,
    infer,
    invalid,
    metadata,
)
from service.ids import new_id
from service.logs import CLIENT
from service.queueing.base import QueueError, QueueFullError
from service.tasks.base import InputError

log = logging.getLogger(__name__)

ENDPOINT = "grpc"  # nlpserve_requests_total's endpoint label of a ModelInfer
STREAM = "grpc_stream"  # ... and of each request on a ModelStreamInfer stream

# REST's status -> the gRPC code of the same cause (a status not here: INTERNAL).
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # as the HTTP middleware takes it
_RAW_DTYPES = {"FP32": "<f4", "INT64": "<i8", "BOOL": "?"}  # the outputs' datatypes but BYTES
_LENGTH = 4  # a BYTES element's length prefix: 4 bytes, little-endian (Triton's encoding)


class Refusal(Exception):
    """An answer other than OK: REST's status, code and message, and a Retry-After."""

    def __init__(self, status: int, code: str, message: str, retry_after: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


def refusal(exc: ApiError | InputError | QueueError) -> Refusal:
    if isinstance(exc, ApiError):
        retry = (exc.headers or {}).get("Retry-After")
        return Refusal(exc.status_code, exc.code, exc.message, retry)
    if isinstance(exc, InputError):
        return Refusal(exc.status_code, exc.code, exc.message)
    retry = None
    code = exc.code
    if isinstance(exc, QueueFullError):
        retry, code = retry_after_header(exc.retry_after_s)["Retry-After"], exc.reason
    elif exc.status_code == 503:
        retry = "1"
    return Refusal(exc.status_code, code, str(exc), retry)


# ---------------------------------------------------------------------------- tensors
def _parameter(p: pb.InferParameter) -> Any:
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def _parameters(params: Any) -> dict[str, Any] | None:
    return {k: _parameter(v) for k, v in params.items()} or None


def _elements(raw: bytes, name: str) -> list[bytes]:
    """The BYTES elements of one ``raw_input_contents`` entry: each a 4-byte little-endian
    length, then that many bytes."""
    out: list[bytes] = []
    i = 0
    while i < len(raw):
        if i + _LENGTH > len(raw):
            raise invalid(
                f"input {name!r}: raw_input_contents ends inside element {len(out)}'s 4-byte "
                "length (BYTES elements are each a 4-byte little-endian length, then the bytes)"
            )
        n = int.from_bytes(raw[i : i + _LENGTH], "little")
        i += _LENGTH
        if i + n > len(raw):
            raise invalid(
                f"input {name!r}: raw_input_contents element {len(out)} says {n} bytes but "
                f"{len(raw) - i} remain"
            )
        out.append(raw[i : i + n])
        i += n
    return out


def _texts(elements: Sequence[bytes], name: str) -> list[str]:
    texts = []
    for k, element in enumerate(elements):
        try:
            texts.append(element.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise invalid(
                f"input {name!r}: element {k} is not UTF-8 text (byte 0x"
                f"{element[e.start]:02x} at position {e.start})"
            ) from None
    return texts


def v2_request(request: pb.ModelInferRequest) -> V2InferenceRequest:
    """The REST model of ``request``: texts from ``contents.bytes_contents`` or from
    ``raw_input_contents`` (one entry per input, in their order)."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise invalid(
            f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: give one per "
            "input, in the order of the inputs"
        )
    inputs = []
    for k, tensor in enumerate(request.inputs):
        if raw and tensor.HasField("contents"):
            raise invalid(
                f"input {tensor.name!r} has contents while the request has raw_input_contents: "
                "give the data one way"
            )
        # another datatype's data is not read: read_items refuses the datatype, in words
        if not raw:
            data = _texts(tensor.contents.bytes_contents, tensor.name)
        elif tensor.datatype == TEXT_DATATYPE:
            data = _texts(_elements(raw[k], tensor.name), tensor.name)
        else:
            data = []
        inputs.append(
            {
                "name": tensor.name,
                "shape": list(tensor.shape),
                "datatype": tensor.datatype,
                "parameters": _parameters(tensor.parameters),
                "data": data,
            }
        )
    outputs = [{"name": o.name, "parameters": _parameters(o.parameters)} for o in request.outputs]
    body = {
        "id": request.id or None,
        "parameters": _parameters(request.parameters),
        "inputs": inputs,
        "outputs": outputs or None,
    }
    try:
        return V2InferenceRequest.model_validate(body)
    except ValidationError as e:
        _, code, message = validation_error([dict(err) for err in e.errors()])
        raise ApiError(400, code, message) from None  # as REST answers a malformed envelope


def _raw(datatype: str, values: list[Any]) -> bytes:
    if datatype == TEXT_DATATYPE:
        encoded = [str(v).encode("utf-8") for v in values]
        return b"".join(len(e).to_bytes(_LENGTH, "little") + e for e in encoded)
    return np.asarray(values, dtype=_RAW_DTYPES[datatype]).tobytes()


def infer_response(payload: dict[str, Any]) -> pb.ModelInferResponse:
    """``v2_tensors.infer``'s answer with every output's data in ``raw_output_contents``,
    as Triton answers (tritonclient's ``as_numpy`` reads every datatype from there)."""
    response = pb.ModelInferResponse(
        model_name=payload["model_name"],
        model_version=payload["model_version"],
        id=payload.get("id") or "",
    )
    for tensor in payload["outputs"]:
        name, datatype, shape = tensor["name"], tensor["datatype"], tensor["shape"]
        response.outputs.add(name=name, datatype=datatype, shape=shape)
        response.raw_output_contents.append(_raw(tensor["datatype"], tensor["data"]))
    return response


# ---------------------------------------------------------------------------- service
def _metadata_pairs(context: aio.ServicerContext) -> list[tuple[bytes, bytes]]:
    pairs = []
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):  # "-bin" keys' values are bytes
            pairs.append((key.lower().encode("latin-1"), value.encode("latin-1", "replace")))
    return pairs


def _priority(context: aio.ServicerContext) -> str | None:
    """The call's ``x-priority`` metadata, as X-Priority is over HTTP (the call's, as its
    deadline and trace are: a stream's every request has it); given twice: both, refused."""
    given = [v for k, v in context.invocation_metadata() or () if k.lower() == "x-priority"]
    return ", ".join(str(v) for v in given) if given else None


# The client times out first: our deadline is its grpc-timeout counted from when the call
# arrived, a transit later than the client's own. A cancel this close to it is the deadline
# (504 in the metrics), not the client going away (499); the first was counted 499 now and then.
DEADLINE_TRANSIT_S = 0.05


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The RPCs of grpc_predict_v2.proto over the API's state. ServerLive and ServerReady
    answer without an API key, as REST's probes (/v2/health/*) do; the others need one where
    keys are configured: ModelReady names the models loaded, as /v2/models/{name}/ready,
    which needs one too."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state

    async def _abort(
        self, context: aio.ServicerContext, refused: Refusal, extra: Sequence[tuple[str, str]] = ()
    ) -> NoReturn:
        trailing = [*extra]
        if refused.retry_after is not None:
            trailing.append(("retry-after", refused.retry_after))
        code = CODES.get(refused.status, grpc.StatusCode.INTERNAL)
        await context.abort(code, refused.message, trailing_metadata=tuple(trailing))
        raise AssertionError("abort returned")  # it raises: this is for the type checker

    def _client(self, pairs: list[tuple[bytes, bytes]]) -> str | None:
        keys = self.state.api_keys
        if keys is None:
            return None
        found = authenticate(keys, pairs)
        if isinstance(found, ApiError):
            raise refusal(found)
        return found

    def _still_client(self, pairs: list[tuple[bytes, bytes]]) -> str | None:
        keys = self.state.api_keys
        if keys is None:
            return None
        found = still_held(keys, pairs)
        if isinstance(found, ApiError):
            raise refusal(found)
        return found

    async def _authenticated(self, context: aio.ServicerContext) -> None:
        try:
            self._client(_metadata_pairs(context))
        except Refusal as r:
            await self._abort(context, r)

    def _task(self, name: str, version: str):
        return find_model(self.state.tasks, name, version or None)

    # ------------------------------------------------------------------ health
    async def ServerLive(self, request: Any, context: aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=await not_ready(self.state) is None)

    async def ModelReady(self, request: Any, context: aio.ServicerContext) -> Any:
        await self._authenticated(context)
        try:
            task = self._task(request.name, request.version)
        except ApiError as e:
            await self._abort(context, refusal(e))
        return pb.ModelReadyResponse(ready=await not_ready(self.state, task.name) is None)

    # ------------------------------------------------------------------ metadata
    async def ServerMetadata(self, request: Any, context: aio.ServicerContext) -> Any:
        await self._authenticated(context)
        return pb.ServerMetadataResponse(name="nlpserve", version=service.__version__)

    async def ModelMetadata(self, request: Any, context: aio.ServicerContext) -> Any:
        await self._authenticated(context)
        try:
            task = self._task(request.name, request.version)
        except ApiError as e:
            await self._abort(context, refusal(e))
        meta = metadata(task)

        def tensors(ts: list[Any]) -> list[Any]:
            T = pb.ModelMetadataResponse.TensorMetadata
            return [T(name=t.name, datatype=t.datatype, shape=t.shape) for t in ts]

        return pb.ModelMetadataResponse(
            name=meta.name,
            versions=meta.versions,
            platform=PLATFORM,
            inputs=tensors(meta.inputs),
            outputs=tensors(meta.outputs),
        )

    # ------------------------------------------------------------------ inference
    def _deadline(self, context: aio.ServicerContext) -> float:
        """The call's deadline, as ``X-Deadline-Ms`` is over HTTP: capped by
        NLPSERVE_DEFAULT_DEADLINE_MS."""
        seconds = self.state.settings.default_deadline_ms / 1000.0
        remaining = context.time_remaining()
        if remaining is not None:
            seconds = min(seconds, max(0.0, remaining))
        return time.monotonic() + seconds

    async def _infer(
        self,
        request: pb.ModelInferRequest,
        context: aio.ServicerContext,
        client: str | None,
        trace: tracecontext.TraceContext,
        rid: str,
        endpoint: str,
    ) -> pb.ModelInferResponse:
        """One inference down ``run_work`` (ModelInfer's, and each of a stream's), counted in
        the metrics under ``endpoint``; any answer but OK raises :class:`Refusal`."""
        t0 = time.perf_counter()
        state = self.state
        model = "unknown"  # the metrics' model until the name is one of the loaded
        status, code = 500, "internal_error"
        priority = priority_class(state, _priority(context), client)
        trace_token = tracecontext.CURRENT.set(trace)
        client_token = CLIENT.set(client)
        try:
            if state.stopping:
                raise ApiError(503, "backend_unavailable", "the service is shutting down")
            task = self._task(request.model_name, request.model_version)
            model = task.name
            body = v2_request(request)
            deadline = self._deadline(context)
            lane = lane_for(state, _priority(context), client)
            payload, _ = await infer(
                task,
                body,
                state.settings.max_batch_items,
                lambda items, decode: run_work(state, task, items, decode, deadline, lane),
            )
            response = infer_response(payload)
            status, code = 200, ""
            return response
        except (ApiError, InputError, QueueError) as e:
            refused = refusal(e)
            status, code = refused.status, refused.code
            raise refused from None
        except asyncio.CancelledError:  # the client cancelled, or its deadline passed
            remaining = context.time_remaining()
            if remaining is not None and remaining <= DEADLINE_TRANSIT_S:
                status, code = 504, "deadline_exceeded"
            else:
                status, code = 499, "client_closed_request"
            raise
        except Exception:
            log.exception("unhandled error on gRPC %s (request %s)", endpoint, rid)
            raise Refusal(500, code, "internal server error (logged)") from None
        finally:
            CLIENT.reset(client_token)
            tracecontext.CURRENT.reset(trace_token)
            m = state.metrics
            exemplar = trace.trace_id if trace.sampled else None
            secs = time.perf_counter() - t0
            m.observe_request(model, endpoint, status, secs, exemplar, priority=priority)
            if status >= 400:
                m.child(m.rejected, model, code).inc()

    async def ModelInfer(self, request: Any, context: aio.ServicerContext) -> Any:
        call = _Call(context)
        trace = call.trace()
        tags = [("x-request-id", call.rid), ("traceparent", trace.traceparent)]
        try:  # before the metrics, as over HTTP: a refused call is no model's request
            client = self._client(call.pairs)
        except Refusal as r:
            log.info("request %s: gRPC ModelInfer refused: %s", call.rid, r.code)
            await self._abort(context, r, tags)
        try:
            response = await self._infer(request, context, client, trace, call.rid, ENDPOINT)
        except Refusal as r:
            await self._abort(context, r, tags)
        context.set_trailing_metadata(tuple(tags))
        return response

    async def ModelStreamInfer(self, request_iterator: Any, context: aio.ServicerContext) -> None:
        """Each request of the stream as a ModelInfer of its own (metrics: ``grpc_stream``),
        answered as it completes, so out of order: ``infer_response.id`` says whose. A
        refusal is that request's ``error_message``; the stream goes on. Up to
        NLPSERVE_GRPC_STREAM_MAX_IN_FLIGHT run at once (they may batch together); at that
        bound the stream is read no further, so HTTP/2's flow control holds the client back.
        The key is the stream's metadata's, checked at the start and again for each request
        (a reload may have deleted it). The client cancelling the stream
        (or its deadline passing) cancels what it has not been answered."""
        call = _Call(context)
        try:  # the stream's key, once here; each request checks it is still in force
            self._client(call.pairs)
        except Refusal as r:
            log.info("request %s: gRPC ModelStreamInfer refused: %s", call.rid, r.code)
            await self._abort(context, r, [("x-request-id", call.rid)])
        slots = asyncio.Semaphore(self.state.settings.grpc_stream_max_in_flight)
        writing = asyncio.Lock()  # grpc.aio allows one write at a time on a call
        running: set[asyncio.Task[None]] = set()
        failed: list[BaseException] = []

        async def answer(request: pb.ModelInferRequest) -> None:
            try:
                # the stream's trace (its metadata), a span of its own per request
                trace = call.trace()
                rid = request.id if _REQUEST_ID.fullmatch(request.id) else call.rid
                try:
                    # the key again: a reload since the stream opened may have revoked it
                    now = self._still_client(call.pairs)
                    response = await self._infer(request, context, now, trace, rid, STREAM)
                    out = pb.ModelStreamInferResponse(infer_response=response)
                except Refusal as r:
                    out = pb.ModelStreamInferResponse(
                        error_message=stream_error(request, r),
                        infer_response=pb.ModelInferResponse(
                            model_name=request.model_name,
                            model_version=request.model_version,
                            id=request.id,
                        ),
                    )
                async with writing:
                    try:
                        await context.write(out)
                    except Exception:
                        if not (context.cancelled() or context.done()):
                            raise
                        # the client left (cancelled, its deadline) mid-write: nobody to answer
                        log.debug("request %s: stream ended before its answer was written", rid)
            finally:
                slots.release()

        try:
            while True:
                await slots.acquire()  # at the bound: stop reading (back-pressure)
                request = await self._read(context)
                if request is None or request is aio.EOF:
                    break
                work = asyncio.create_task(answer(request))
                running.add(work)
                work.add_done_callback(lambda w: _settled(w, running, failed))
            while running:  # the client closed its side: answer what it sent, then end
                await asyncio.gather(*running, return_exceptions=True)  # _settled logs them
            if failed:  # a request's answer failed (logged): the stream ends INTERNAL
                refused = Refusal(500, "internal_error", "internal server error (logged)")
                await self._abort(context, refused, [("x-request-id", call.rid)])
            if request is None:  # shutting down: its answers sent, the stream ends
                refused = Refusal(503, "backend_unavailable", SHUTTING_DOWN_STREAM)
                await self._abort(context, refused, [("x-request-id", call.rid)])
            context.set_trailing_metadata((("x-request-id", call.rid),))
        finally:  # cancelled (the client left, its deadline passed) or failed: withdraw
            left = list(running)
            for work in left:
                work.cancel()
            await asyncio.gather(*left, return_exceptions=True)

    async def _read(self, context: aio.ServicerContext) -> Any:
        """The stream's next request (or ``aio.EOF``); None once the service is shutting
        down: a stream may stay open for hours, so it ends then rather than when the
        shutdown's grace runs out, and its client reconnects to another replica."""
        stopped = self.state.stopped
        if stopped.is_set():
            return None
        reading = asyncio.ensure_future(context.read())
        stopping = asyncio.ensure_future(stopped.wait())
        try:
            await asyncio.wait((reading, stopping), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            reading.cancel()
            raise
        finally:
            stopping.cancel()
        if reading.done():
            return reading.result()
        reading.cancel()  # shutting down: read no further
        return None

    # ------------------------------------------------------------------ repository
    async def RepositoryIndex(self, request: Any, context: aio.ServicerContext) -> Any:
        """The models served, each at its one version: ``READY``, or ``UNAVAILABLE`` with
        the reason while it cannot serve (``ready: true`` asks for the ready ones only). The
        repository's name is not read: the server has one, NLPSERVE_MODEL_DIR."""
        await self._authenticated(context)
        Index = pb.RepositoryIndexResponse.ModelIndex
        models = []
        for name, task in sorted(self.state.tasks.items()):
            why = await not_ready(self.state, name)
            if why is None:
                models.append(Index(name=name, version=task.manifest.version, state="READY"))
            elif not request.ready:
                models.append(
                    Index(
                        name=name,
                        version=task.manifest.version,
                        state="UNAVAILABLE",
                        reason=why.message,
                    )
                )
        return pb.RepositoryIndexResponse(models=models)

    async def RepositoryModelLoad(self, request: Any, context: aio.ServicerContext) -> Any:
        await self._authenticated(context)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, NO_RUNTIME_LOADING)

    async def RepositoryModelUnload(self, request: Any, context: aio.ServicerContext) -> Any:
        await self._authenticated(context)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, NO_RUNTIME_LOADING)


NO_RUNTIME_LOADING = (
    "nlpserve does not load or unload models at runtime: it serves the models of "
    "NLPSERVE_MODEL_DIR (NLPSERVE_LOAD_MODELS: which of them) loaded at startup; change "
    "those and restart (or roll out new replicas) to change them"
)


SHUTTING_DOWN_STREAM = (
    "the service is shutting down: the requests this stream sent were answered; open a new "
    "stream (another replica) for more"
)


def stream_error(request: pb.ModelInferRequest, refused: Refusal) -> str:
    """A stream's refusal of one request, in words: no status travels with it, so its gRPC
    code leads, and the request's id follows (tritonclient's callback sees only the words)."""
    code = CODES.get(refused.status, grpc.StatusCode.INTERNAL).name
    text = f"{code}: {refused.message}"
    if request.id:
        text += f" (request {request.id!r})"
    if refused.retry_after is not None:
        text += f"; retry after {refused.retry_after} s"
    return text


def _settled(
    work: asyncio.Task[None], running: set[asyncio.Task[None]], failed: list[BaseException]
) -> None:
    """A stream's answer task done: out of ``running``, its failure retrieved here, logged
    once and kept in ``failed`` (a task done while the stream still reads is awaited by
    nobody: asyncio would log "Task exception was never retrieved" at its collection)."""
    running.discard(work)
    if work.cancelled():
        return
    exc = work.exception()
    if exc is not None:
        log.error("gRPC stream request failed", exc_info=exc)
        failed.append(exc)


class _Call:
    """What a call's metadata says: its pairs, request id and the caller's trace."""

    def __init__(self, context: aio.ServicerContext) -> None:
        self.pairs = _metadata_pairs(context)
        given = dict(self.pairs).get(b"x-request-id", b"").decode("latin-1")
        self.rid = given if _REQUEST_ID.fullmatch(given) else new_id()

    def trace(self) -> tracecontext.TraceContext:
        """The caller's trace (a new one without a valid ``traceparent``), a new span."""
        return tracecontext.from_headers(
            [v for k, v in self.pairs if k == b"traceparent"],
            [v for k, v in self.pairs if k == b"tracestate"],
        )


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def probe_port(host: str, port: int, where: str) -> None:
    """GrpcPortError where another process listens on the port. Asked before grpcio is:
    its C core writes its own error line to stderr (not Python's logging: nothing to
    silence there) before ``add_insecure_port`` raises, and `nlpserve serve` is to end
    with one line. grpcio still has the last word (it binds what the name resolves to)."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return  # grpcio's resolver says what is wrong with the name
    for family, kind, proto, _, sockaddr in found:
        with socket.socket(family, kind, proto) as probe:
            # as grpcio binds: a closed connection's TIME_WAIT is no obstacle, a listener is
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as e:
                if e.errno in (errno.EADDRINUSE, errno.EACCES):
                    raise GrpcPortError(
                        f"NLPSERVE_GRPC_PORT: {where} cannot be bound ({e.strerror})"
                    ) from None
                # another failure (an address family the host lacks): grpcio decides


async def start_grpc(state: ServiceState) -> aio.Server:
    """The gRPC server on NLPSERVE_HOST:NLPSERVE_GRPC_PORT, started (GrpcPortError if the
    port cannot be bound)."""
    settings = state.settings
    server = aio.server(
        options=[
            # the HTTP body limit: a message over it is RESOURCE_EXHAUSTED, before any work
            ("grpc.max_receive_message_length", settings.max_body_bytes),
            # a port another process holds is an error, not a port shared with it
            ("grpc.so_reuseport", 0),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(state), server)
    where = address(settings.host, settings.grpc_port)
    probe_port(settings.host, settings.grpc_port, where)
    try:
        bound = server.add_insecure_port(where)
    except RuntimeError as e:  # grpcio raises where older ones returned 0
        raise GrpcPortError(f"NLPSERVE_GRPC_PORT: {where} cannot be bound ({e})") from None
    if not bound:
        raise GrpcPortError(f"NLPSERVE_GRPC_PORT: {where} cannot be bound")
    await server.start()
    log.info("gRPC (Open Inference Protocol) on %s", where)
    return server

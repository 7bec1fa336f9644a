"""Helpers for service tests: settings, a live uvicorn in the test's event loop, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI

from service.api.app import create_app
from service.api.deps import ServiceState
from service.batching import WorkItem
from service.config import Settings
from service.loop_lag import INTERVAL_S
from service.queueing.inprocess import InProcessQueue
from service.runtime.runner import ModelRunner

# --------------------------------------------------------------------------- models
BUILD_ERRORS = ".build-errors.json"  # written by conftest's model_repo: name -> error
QA_MODEL, DETECT_MODEL, POS_MODEL, POLARITY_MODEL = "qa-zh", "detector-en", "pos-en", "polarity-en"


def require_model(repo: Path, name: str) -> None:
    """Skip the calling test when ``name`` could not be built (and say why)."""
    if (repo / name).is_dir():
        return
    errors_file = repo / BUILD_ERRORS
    errors = json.loads(errors_file.read_text()) if errors_file.exists() else {}
    pytest.skip(f"test model {name} unavailable: {errors.get(name, 'no builder yet')}")


def diverged_detector_repo(model_repo: Path, dest: Path) -> Path:
    """A repository at ``dest`` holding a copy of the tiny detector whose unknown-word
    embedding row is NaN: a real model that diverged, so a text with an unknown word fails
    inference (422 inference_failed) while others are answered. Needs the train extra
    (onnx) and the tiny detector: skips the caller otherwise."""
    import shutil

    from tokenizers import Tokenizer

    onnx = pytest.importorskip("onnx", reason="the train extra is not installed")
    from onnx import numpy_helper

    from service.repository import sha256_file

    require_model(model_repo, DETECT_MODEL)
    folder = dest / DETECT_MODEL / "1"
    shutil.copytree(model_repo / DETECT_MODEL / "1", folder)
    unk = Tokenizer.from_file(str(folder / "tokenizer.json")).token_to_id("[UNK]")
    model = onnx.load(folder / "model.onnx")
    (emb,) = [i for i in model.graph.initializer if i.name.endswith("word_embeddings.weight")]
    weights = numpy_helper.to_array(emb).copy()
    weights[unk] = np.nan
    emb.CopyFrom(numpy_helper.from_array(weights, emb.name))
    onnx.save(model, folder / "model.onnx")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["variants"]["fp32"]["sha256"] = sha256_file(folder / "model.onnx")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return dest


# --------------------------------------------------------------------------- settings
def make_settings(model_dir: Path, **overrides: Any) -> Settings:
    """Test settings: small, deterministic, independent of NLPSERVE_* in the environment."""
    base: dict[str, Any] = dict(
        model_dir=model_dir,
        host="127.0.0.1",
        port=0,
        providers="CPUExecutionProvider",
        intra_op_threads=1,
        inter_op_threads=1,
        max_wait_ms=2.0,
        max_batch_size=32,
        max_batch_tokens=4096,
        min_padding_efficiency=0.0,  # batching tests spell out any padding floor they test
        max_queue_depth=256,
        default_deadline_ms=20_000,
        shutdown_timeout_s=5.0,
        queue="inprocess",
        variant=None,
        require_gpu=False,
        buckets={},
    )
    base.update(overrides)
    return Settings(**base)


# --------------------------------------------------------------------------- live server
class _QuietServer(uvicorn.Server):
    # Leave SIGINT/SIGTERM to pytest: the test decides when the server stops.
    @contextlib.contextmanager
    def capture_signals(self):
        yield


class LiveServer:
    """A real uvicorn on 127.0.0.1:<free port> running in the current event loop."""

    def __init__(self, app: FastAPI, settings: Settings) -> None:
        # The service's default port may be a `make run` or another suite's server: such a
        # test failed only while something else listened there.
        default_port = Settings.model_fields["port"].default
        assert settings.port != default_port, f"a test server on port {default_port}: use 0"
        self.app = app
        self.settings = settings
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", settings.port))  # make_settings: 0, any free port
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=int(max(1, settings.shutdown_timeout_s)),
            access_log=False,
        )
        self.server = _QuietServer(config)
        self._task: asyncio.Task[None] | None = None
        # The gRPC port (free_port()'s) is bound only after the models load, seconds later:
        # held till then so that no other test process takes it meanwhile. SO_REUSEADDR and
        # never listening: the server's own bind and listen still succeed.
        self._grpc_hold: socket.socket | None = None
        if settings.grpc_port:
            hold = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                hold.bind((settings.host, settings.grpc_port))
                self._grpc_hold = hold
            except OSError:  # taken already (a test of that): the server says so itself
                hold.close()

    @property
    def state(self) -> ServiceState:
        return self.app.state.service

    @property
    def queue(self) -> InProcessQueue:
        q = self.state.queue
        assert isinstance(q, InProcessQueue), "this test needs the in-process queue"
        return q

    async def _serve(self) -> None:
        try:
            await self.server.serve(sockets=[self.sock])
        except SystemExit as e:
            # uvicorn's failed startup: asyncio lets SystemExit out of the event loop, which
            # ends the whole session without a summary; this fails the test, with the cause
            raise RuntimeError(
                f"server startup failed: {self.state.startup_error!r} (exit {e.code})"
            ) from None

    async def start(self) -> LiveServer:
        try:
            return await self._start()
        finally:
            if self._grpc_hold is not None:
                self._grpc_hold.close()
                self._grpc_hold = None

    async def _start(self) -> LiveServer:
        self._task = asyncio.create_task(self._serve())
        t0 = time.monotonic()
        while not self.server.started:
            if self._task.done():
                self._task.result()  # startup failed: raise its error
                raise RuntimeError("server exited during startup")
            if time.monotonic() - t0 > 60:
                raise TimeoutError("server did not start")
            await asyncio.sleep(0.01)
        return self

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            await asyncio.wait_for(self._task, timeout=30)
        self.sock.close()
        if self._grpc_hold is not None:  # never started
            self._grpc_hold.close()

    def client(self, **kw: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=30, **kw)


@asynccontextmanager
async def live_server(settings: Settings) -> AsyncIterator[LiveServer]:
    srv = await LiveServer(create_app(settings), settings).start()
    try:
        yield srv
    finally:
        await srv.stop()


def rounded(value: Any) -> Any:
    """A JSON answer with its floats rounded to 4 places, for comparing two servers' answers:
    int8 scores of the same input alone in its batch are deterministic; rounding only keeps
    float printing out of the comparison."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


async def read_metrics(c: httpx.AsyncClient) -> str:
    r = await c.get("/metrics")
    assert r.status_code == 200
    return r.text


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the series ``name`` whose labels include ``labels`` (0.0 if none)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        series, _, rest = head.partition("{")
        if series != name:
            continue
        got = {}
        for kv in rest.rstrip("}").split(","):
            if "=" in kv:
                k, v = kv.split("=", 1)
                got[k] = v.strip('"')
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


# --------------------------------------------------------------------------- event-loop lag
# How long the loop-lag tests block their event loop: the monitor (service/loop_lag.py)
# then wakes at least LOOP_STALL_S - INTERVAL_S late, past the 0.25 bucket.
LOOP_STALL_S = 0.4
LATE_S = "0.25"


def late_wakeups(text: str) -> float:
    """Wake-ups of the loop-lag monitor over LATE_S late, from a /metrics text."""
    count = metric_value(text, "nlpserve_event_loop_lag_seconds_count")
    return count - metric_value(text, "nlpserve_event_loop_lag_seconds_bucket", le=LATE_S)


async def stall_loop(read: Callable[[], Awaitable[str]]) -> tuple[str, str]:
    """Block the running event loop for LOOP_STALL_S, as a CPU-bound handler would, and
    return /metrics (from ``read``) before and once the monitor on this loop recorded it."""
    await asyncio.sleep(2 * INTERVAL_S)  # a monitor started just now is asleep by then
    before = await read()
    time.sleep(LOOP_STALL_S)  # on purpose: the server's monitor runs on this loop
    t0 = time.monotonic()
    while late_wakeups(after := await read()) <= late_wakeups(before):
        if time.monotonic() - t0 > 10:
            raise AssertionError("the late wake-up was never recorded")
        await asyncio.sleep(0.05)
    return before, after


def post_polarity(
    c: httpx.AsyncClient,
    key: str,
    n: int = 1,
    *,
    text: str = "a fine film",
    deadline_ms: int | None = None,
) -> asyncio.Task[httpx.Response]:
    """A /v1/polarity request of ``n`` distinct texts with the API key ``key``, sent at once
    (a task: await it for the response, or let it wait in a paused queue)."""
    body = {"inputs": [{"text": f"{text} {i}"} for i in range(n)]}
    headers = {"X-API-Key": key}
    if deadline_ms is not None:
        headers["X-Deadline-Ms"] = str(deadline_ms)
    return asyncio.create_task(c.post("/v1/polarity", json=body, headers=headers))


async def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``cond`` (a state check, not a timing assumption) until true."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.002)


# A proxy stands in for a ModelRunner wherever one goes: the type checker is told so.
if TYPE_CHECKING:
    _RunnerBase = ModelRunner
else:
    _RunnerBase = object


class RunnerProxy(_RunnerBase):
    """A real runner, wrapped: every attribute but those a subclass defines is the inner
    runner's."""

    def __init__(self, inner: ModelRunner) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class GatedRunner(RunnerProxy):
    """A real runner whose batches wait at a gate before they run; counts how many run at
    once (a state check: no timing assumption). :meth:`step` lets one batch through while
    the gate stays shut."""

    def __init__(self, inner: ModelRunner) -> None:
        super().__init__(inner)
        self.gate = threading.Event()
        self.permits = threading.Semaphore(0)
        self.lock = threading.Lock()
        self.active = 0
        self.most = 0
        self.started: list[tuple[int, ...]] = []  # each batch's lengths, in start order

    def run_batch(
        self, items: Sequence[WorkItem], *, record: bool = True
    ) -> list[dict[str, np.ndarray]]:
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
            self.started.append(tuple(it.length for it in items))
        try:
            assert self._passed(10.0), "gate never opened"
            return self.inner.run_batch(items, record=record)
        finally:
            with self.lock:
                self.active -= 1

    def step(self) -> None:
        """Let the next batch (one) through the shut gate."""
        self.permits.release()

    def _passed(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while not self.gate.is_set():
            if self.permits.acquire(timeout=0.005):
                return True
            if time.monotonic() > end:
                return False
        return True

"""A real Redis server for tests: spawned from ``redis-server`` on PATH on a free port.

``NLPSERVE_REDIS_URL`` set → tests use that server instead (keys are namespaced per test
with a random ``redis_prefix``, so a shared server is safe; restart tests then skip).

Importable from any conftest: ``from tests.redis_support import redis_url  # noqa: F401``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from service.config import Settings

EXTERNAL_URL = os.environ.get("NLPSERVE_REDIS_URL")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One ``redis-server`` child process without persistence; stop/start keep the port."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not on PATH (.ci/run installs it)")
        self.exe = exe
        self.port = port or free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        # appended to the command line, where they win over the defaults above them (TLS,
        # an ACL file: tests/redis_backend/test_redis_production.py)
        self.extra_args: list[str] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                self.exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--loglevel",
                "warning",
                *self.extra_args,
            ],  # fmt: skip
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            if self.ping():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.kill()  # abrupt, like a crash: no persistence anyway
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self.proc = None


def unique_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a Redis server shared by the whole test session."""
    if EXTERNAL_URL:
        yield EXTERNAL_URL
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_prefix() -> str:
    """A fresh key namespace, so tests sharing one server never see each other's streams."""
    return unique_prefix()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private Redis server the test may stop and restart."""
    if EXTERNAL_URL:
        pytest.skip("NLPSERVE_REDIS_URL is set: not stopping a server this suite did not start")
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@asynccontextmanager
async def redis_backend(settings: Settings) -> AsyncIterator[Settings]:
    """``QUEUE_BACKENDS["redis"]`` of tests/conftest.py: a Redis server (spawned unless
    ``NLPSERVE_REDIS_URL`` is set) and one worker on the caller's event loop; yields the
    settings an API replica needs to use them."""
    from service.runtime.runner import load_runners
    from service.worker import Worker

    server: RedisServer | None = None
    url = EXTERNAL_URL
    workdir = tempfile.TemporaryDirectory(prefix="nlpserve-redis-")
    if not url:
        server = RedisServer(Path(workdir.name))
        server.start()
        url = server.url
    s = settings.model_copy(
        update={
            "queue": "redis",
            "redis_url": url,
            "redis_prefix": unique_prefix(),
            "redis_block_ms": 100,
            "redis_claim_idle_ms": 2000,
            "metrics_port": 0,
            "metrics_host": "127.0.0.1",
        }
    )
    try:
        runners = await asyncio.to_thread(load_runners, s)
        worker = Worker(s, runners)
        task = asyncio.create_task(worker.run(), name="test-redis-worker")
        try:
            yield s
        finally:
            worker.stop()
            try:
                await asyncio.wait_for(task, timeout=15)
            except TimeoutError:
                task.cancel()
    finally:
        if server is not None:
            server.stop()
        workdir.cleanup()

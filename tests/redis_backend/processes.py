"""The scale-out topology as child processes, for tests over real HTTP: a spawned
redis-server, ``nlpserve serve`` replicas (NLPSERVE_QUEUE=redis) and ``nlpserve worker``s."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import redis

from service.queueing.redis_keys import GROUP
from tests.faketime_support import release
from tests.redis_support import RedisServer, free_port, unique_prefix


class Proc:
    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        self._fh = self.log.open("wb")
        self.p = subprocess.Popen(
            [sys.executable, "-m", "service.cli", *args],
            env=env,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
        )

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.alive():
            self.p.send_signal(sig)
            try:
                self.p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(timeout=5)
        self._fh.close()
        release(self.p)
        return self.p.returncode

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


class Cluster:
    def __init__(self, tmp: Path, repo: Path) -> None:
        self.tmp = tmp
        self.redis = RedisServer(tmp / "redis")
        self.redis.start()
        self.env = {
            **os.environ,
            "NLPSERVE_QUEUE": "redis",
            "NLPSERVE_REDIS_URL": self.redis.url,
            "NLPSERVE_REDIS_PREFIX": unique_prefix(),
            "NLPSERVE_MODEL_DIR": str(repo),
            "NLPSERVE_HOST": "127.0.0.1",
            "NLPSERVE_PROVIDERS": "CPUExecutionProvider",
            "NLPSERVE_INTRA_OP_THREADS": "1",
            "NLPSERVE_MAX_WAIT_MS": "5",
            "NLPSERVE_MAX_QUEUE_DEPTH": "5000",
            "NLPSERVE_REDIS_BLOCK_MS": "200",
            # dead workers' entries move after 2 s (prod: 15 s); shorter, and a loaded CI
            # machine's scheduling stalls hand live work over too
            "NLPSERVE_REDIS_CLAIM_IDLE_MS": "2000",
            "NLPSERVE_METRICS_HOST": "127.0.0.1",
            "NLPSERVE_LOG_LEVEL": "WARNING",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
        }
        self.apis: list[tuple[Proc, str]] = []
        self.workers: list[tuple[Proc, int]] = []

    def start_api(self, **env: str) -> str:
        port = free_port()
        n = len(self.apis)
        p = Proc(f"api{n}", ["serve"], {**self.env, "NLPSERVE_PORT": str(port), **env}, self.tmp)
        url = f"http://127.0.0.1:{port}"
        self.apis.append((p, url))
        return url

    def start_worker(self, **env: str) -> tuple[Proc, int]:
        port = free_port()
        name = f"worker{len(self.workers)}"
        env = {
            **self.env,
            "NLPSERVE_METRICS_PORT": str(port),
            "NLPSERVE_WORKER_NAME": name,  # its consumer name in the group
            **env,
        }
        self.workers.append((Proc(name, ["worker"], env, self.tmp), port))
        return self.workers[-1]

    def pending_of(self, consumer: str) -> int:
        """Entries the consumer has read and not acknowledged, over every stream."""
        r = redis.Redis.from_url(self.redis.url)
        try:
            total = 0
            for key in r.scan_iter(f"{self.env['NLPSERVE_REDIS_PREFIX']}:*", _type="stream"):
                for c in r.xinfo_consumers(key, GROUP) if r.xinfo_groups(key) else []:
                    if c["name"].decode() == consumer:
                        total += int(c["pending"])
            return total
        finally:
            r.close()

    def wait_ready(self, timeout: float = 90.0) -> None:
        urls = [u + "/readyz" for p, u in self.apis if p.alive()]
        urls += [f"http://127.0.0.1:{port}/readyz" for p, port in self.workers if p.alive()]
        end = time.monotonic() + timeout
        for url in urls:
            while not is_ok(url):
                for p, _ in self.apis + self.workers:
                    if not p.alive() and p.p.returncode not in (-9, 0):
                        raise RuntimeError(f"{p.name} exited:\n{p.tail()}")
                if time.monotonic() > end:
                    raise TimeoutError(f"{url} not ready:\n" + self.logs())
                time.sleep(0.1)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.tail()}" for p, _ in self.apis + self.workers)

    def close(self) -> None:
        for p, _ in self.workers + self.apis:
            p.stop()
        self.redis.stop()


def is_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


class Reply:
    """What the tests need of an HTTP response."""

    def __init__(self, status_code: int, text: str) -> None:
        self.status_code = status_code
        self.text = text

    def json(self) -> dict:
        return json.loads(self.text)


async def post(url: str, path: str, body: dict) -> Reply:
    """One POST on its own connection: a minimal HTTP/1.1 client, because a full one costs
    more CPU in this process than the whole cluster spends answering (2 shared cores)."""
    host, _, port = url.removeprefix("http://").partition(":")
    data = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
            + data
        )
        raw = await reader.read()
    finally:
        writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        payload = _dechunk(payload)
    return Reply(status, payload.decode())


def _dechunk(b: bytes) -> bytes:
    out, i = b"", 0
    while True:
        j = b.index(b"\r\n", i)
        n = int(b[i:j], 16)
        if n == 0:
            return out
        out += b[j + 2 : j + 2 + n]
        i = j + 2 + n + 2

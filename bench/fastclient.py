"""A minimal asyncio HTTP/1.1 keep-alive client for the load generator.

Why not httpx: on this 2-core machine the load generator shares the CPU with the server it
measures, and httpx's AsyncClient costs several milliseconds of CPU per request (measured:
6-8 ms/request at concurrency 32), most of a core at a few hundred requests/s. That cost
would be charged to whichever server is faster, and would make "fraction of raw ONNX
Runtime" a measurement of the client. This client does only what the benchmark needs:
``POST``/``GET`` with a pre-encoded body over a pool of persistent connections to one host,
``Content-Length`` or chunked responses, and ``Connection: close``.

Transport failures (refused, reset, a connection closed mid-response, timeout) raise
:class:`TransportError`, which the load generator treats like httpx's ``TransportError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from urllib.parse import urlsplit

# An idle connection older than this is closed, not reused: nlpserve closes idle keep-alive
# connections after 5 s (service/server.py KEEP_ALIVE_S), and a request sent on one the server
# is closing fails with a reset or an incomplete read that is no fault of the server under
# test (seen in bench.overload's quiet phases).
MAX_IDLE_S = 4.0


class TransportError(Exception):
    """No (complete) HTTP response: connection refused/reset/closed, or timeout."""


class Response:
    __slots__ = ("status", "headers", "content")

    def __init__(self, status: int, headers: dict[str, str], content: bytes) -> None:
        self.status = status
        self.headers = headers  # lower-cased names
        self.content = content


_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class FastClient:
    def __init__(self, base_url: str, max_connections: int = 32, timeout_s: float = 60.0,
                 headers: dict[str, str] | None = None,
                 max_idle_s: float = MAX_IDLE_S) -> None:  # fmt: skip
        u = urlsplit(base_url)
        if u.scheme != "http":
            raise ValueError(f"FastClient speaks plain http only, not {u.scheme!r}")
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        self.prefix = u.path.rstrip("/")
        self.timeout_s = timeout_s
        self.max_idle_s = max_idle_s
        self._idle: list[tuple[_Conn, float]] = []  # with when it went idle
        self._slots = asyncio.Semaphore(max_connections)
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._common = f"Host: {self.host}:{self.port}\r\n{extra}".encode("latin-1")

    async def __aenter__(self) -> FastClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for (_, w), _since in idle:
            w.close()
            with contextlib.suppress(Exception):
                await w.wait_closed()

    async def request(self, method: str, path: str, body: bytes = b"",
                      content_type: str = "application/json") -> Response:  # fmt: skip
        async with self._slots:
            conn = self._idle_conn()
            try:
                if conn is None:
                    conn = await asyncio.wait_for(
                        asyncio.open_connection(self.host, self.port), self.timeout_s
                    )
                resp, keep = await asyncio.wait_for(
                    self._exchange(conn, method, path, body, content_type), self.timeout_s
                )
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    TimeoutError, ValueError) as e:  # fmt: skip
                if conn is not None:
                    conn[1].close()
                raise TransportError(f"{type(e).__name__}: {e}") from e
            if keep:
                self._idle.append((conn, time.monotonic()))
            else:
                conn[1].close()
            return resp

    def _idle_conn(self) -> _Conn | None:
        """The most recently used idle connection, unless it is too old to reuse; then it
        and every other idle one (idle longer still) are closed."""
        if not self._idle:
            return None
        conn, since = self._idle[-1]
        if time.monotonic() - since <= self.max_idle_s:
            self._idle.pop()
            return conn
        for (_, w), _since in self._idle:
            w.close()
        self._idle.clear()
        return None

    async def post(self, path: str, body: bytes) -> Response:
        return await self.request("POST", path, body)

    async def get(self, path: str) -> Response:
        return await self.request("GET", path)

    async def _exchange(self, conn: _Conn, method: str, path: str, body: bytes,
                        content_type: str) -> tuple[Response, bool]:  # fmt: skip
        reader, writer = conn
        head = f"{method} {self.prefix}{path} HTTP/1.1\r\n".encode("latin-1") + self._common
        if body or method == "POST":
            head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n".encode()
        writer.write(head + b"\r\n" + body)
        await writer.drain()
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            content = await reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")  # no trailers are ever sent to us
                    break
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            content = b"".join(parts)
        else:  # body delimited by the end of the connection
            content = await reader.read()
            return Response(status, headers, content), False
        keep = headers.get("connection", "").lower() != "close"
        return Response(status, headers, content), keep

"""Auto-pipelining: the Redis commands queued in one event-loop moment go out in one round
trip. One pipeline is in flight at a time; whatever is queued meanwhile goes in the next, so
a burst of N requests costs a few round trips on one connection instead of N commands on N
pooled connections (a redis-py command costs the event loop ~0.1 ms of CPU on its own). The
queue's admissions (redis_queue.py) and the per-client counts (redis_client_counts.py) each
keep one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

from service.queueing.base import BackendUnavailableError


class Command(Protocol):
    @property
    def fut(self) -> asyncio.Future[Any]:
        """Answered with the command's result (or its error)."""


C = TypeVar("C", bound=Command)


class AutoPipeline(Generic[C]):
    """Commands sent by ``run`` (a batch in, a result or an exception per command out, in
    order), a batch at a time, in the order they were queued.

    A command whose future was cancelled before its batch went out is not sent, unless
    ``always_sent`` says so (a release must reach Redis whoever waits for it). One that ran
    for a caller that gave up (cancelled with it in flight, or always sent; or, through
    :meth:`call`, after its answer came and before the caller resumed): ``gave_up`` gets its
    result (not an error), to undo it."""

    def __init__(
        self,
        run: Callable[[list[C]], Awaitable[list[Any]]],
        name: str,
        always_sent: Callable[[C], bool] | None = None,
        gave_up: Callable[[C, Any], None] | None = None,
    ) -> None:
        self._run = run
        self._name = name
        self._always_sent = always_sent
        self._gave_up = gave_up
        self._pending: list[C] = []
        self._sending: asyncio.Task[None] | None = None
        self._closed: Exception | None = None

    def send(self, command: C) -> None:
        """Queue ``command`` for the next batch; its future gets the answer."""
        if self._closed is not None:
            command.fut.set_exception(self._closed)
            return
        self._pending.append(command)
        if self._sending is None or self._sending.done():
            self._sending = asyncio.get_running_loop().create_task(self._loop(), name=self._name)

    async def call(self, command: C) -> Any:
        """Send ``command`` and return its answer (or raise its error)."""
        self.send(command)
        fut = command.fut
        try:
            return await fut
        except asyncio.CancelledError:
            # cancelled once the answer was set, before this task resumed: it ran, and the
            # caller never learns what to undo
            ran = fut.done() and not fut.cancelled() and fut.exception() is None
            if ran and self._gave_up is not None:
                self._gave_up(command, fut.result())
            raise

    async def close(self, error: Exception) -> None:
        """Fail what is queued or in flight with ``error`` (its answer would never be read),
        and what is sent from now on."""
        self._closed = error
        pending, self._pending = self._pending, []
        for c in pending:
            if not c.fut.done():
                c.fut.set_exception(error)
        if self._sending is not None:
            self._sending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sending

    async def _loop(self) -> None:
        while self._pending:
            batch = [c for c in self._pending if not c.fut.cancelled() or self._sent_anyway(c)]
            self._pending = []
            if not batch:
                continue
            try:
                results = await self._run(batch)
            except asyncio.CancelledError:  # closed: nobody reads these answers
                for c in batch:
                    if not c.fut.done():
                        c.fut.set_exception(self._closed or BackendUnavailableError("closed"))
                raise
            except Exception as e:  # the connection lost etc.: each command raises it
                results = [e] * len(batch)
            for c, res in zip(batch, results, strict=True):
                if c.fut.cancelled():
                    if self._gave_up is not None and not isinstance(res, Exception):
                        self._gave_up(c, res)
                elif not c.fut.done():
                    if isinstance(res, Exception):
                        c.fut.set_exception(res)
                    else:
                        c.fut.set_result(res)

    def _sent_anyway(self, command: C) -> bool:
        return self._always_sent is not None and self._always_sent(command)

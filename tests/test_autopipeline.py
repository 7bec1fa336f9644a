"""The auto-pipeline both Redis users share (service/queueing/autopipeline.py), on a batch
runner that records what it is sent: the commands of one event-loop moment go out in one
batch, in order, one batch at a time; a command given up before its batch went out is not
sent, unless it must always be (a release); one given up that ran anyway (in flight, always
sent, or answered before its caller resumed) is handed back with its result (to undo it);
an error fails each command of its batch; close fails what is queued or in flight, and what
is sent after it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from service.queueing.autopipeline import AutoPipeline
from service.queueing.base import BackendUnavailableError


@dataclass
class Cmd:
    name: str
    always: bool = False
    fut: asyncio.Future[Any] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Runner:
    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.error: Exception | None = None

    async def __call__(self, batch: list[Cmd]) -> list[Any]:
        self.batches.append([c.name for c in batch])
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        return [f"{c.name}!" for c in batch]


def pipeline(runner: Runner, undone: list[tuple[str, Any]]) -> AutoPipeline[Cmd]:
    return AutoPipeline(
        runner,
        "test",
        always_sent=lambda c: c.always,
        gave_up=lambda c, res: undone.append((c.name, res)),
    )


async def test_one_moment_one_batch_in_order_and_what_is_given_up() -> None:
    runner, undone = Runner(), list[tuple[str, Any]]()
    pipe = pipeline(runner, undone)
    first = [Cmd("a"), Cmd("b"), Cmd("c")]
    for c in first:
        pipe.send(c)
    assert [await c.fut for c in first] == ["a!", "b!", "c!"]
    assert runner.batches == [["a", "b", "c"]]

    runner.gate.clear()  # a batch in flight: what is sent meanwhile waits for the next
    inflight, waiting = Cmd("d"), Cmd("e")
    pipe.send(inflight)
    await asyncio.sleep(0)
    gone, release, later = Cmd("f"), Cmd("g", always=True), Cmd("h")
    for c in (gone, release, later):
        pipe.send(c)
    pipe.send(waiting)
    inflight.fut.cancel()  # gave up while its script ran: handed back to be undone
    gone.fut.cancel()  # gave up before it went out: not sent
    release.fut.cancel()  # ... but this one must reach Redis
    runner.gate.set()
    assert await later.fut == "h!" and await waiting.fut == "e!"
    assert runner.batches[1:] == [["d"], ["g", "h", "e"]]
    assert undone == [("d", "d!"), ("g", "g!")]  # both ran, nobody waiting


async def test_an_error_fails_its_batch_and_close_fails_the_rest() -> None:
    runner, undone = Runner(), list[tuple[str, Any]]()
    pipe = pipeline(runner, undone)
    runner.error = ConnectionError("lost")
    a, b = Cmd("a"), Cmd("b")
    pipe.send(a)
    pipe.send(b)
    for c in (a, b):
        with pytest.raises(ConnectionError):
            await c.fut
    runner.error = None

    runner.gate.clear()
    inflight = Cmd("c")
    pipe.send(inflight)
    await asyncio.sleep(0)
    queued = Cmd("d")
    pipe.send(queued)
    closed = BackendUnavailableError("the service is shutting down")
    await pipe.close(closed)
    after = Cmd("e")
    pipe.send(after)
    for c in (inflight, queued, after):
        with pytest.raises(BackendUnavailableError, match="shutting down"):
            await c.fut
    assert runner.batches == [["a", "b"], ["c"]] and not undone


async def test_call_hands_back_an_answer_its_caller_never_read() -> None:
    """Cancelled after the answer was set, before the caller resumed: the command ran and
    the caller cannot undo it, so ``gave_up`` gets it."""
    runner, undone = Runner(), list[tuple[str, Any]]()
    pipe = pipeline(runner, undone)
    callers: list[asyncio.Task[Any]] = []
    run = pipe._run

    async def answered_then_cancelled(batch: list[Cmd]) -> list[Any]:
        results = await run(batch)
        asyncio.get_running_loop().call_soon(lambda: [t.cancel() for t in callers])
        return results

    pipe._run = answered_then_cancelled
    callers.append(asyncio.create_task(pipe.call(Cmd("a"))))
    with pytest.raises(asyncio.CancelledError):
        await callers[0]
    assert undone == [("a", "a!")]
    pipe._run = run
    assert await pipe.call(Cmd("b")) == "b!" and undone == [("a", "a!")]

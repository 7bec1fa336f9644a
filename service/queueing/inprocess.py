"""The default queue: batches and runs in this process, inference on executor threads."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.batching import BucketScheduler, WorkItem
from service.batching.scheduler import (
    PREDICT_LANE,
    lane_for_next_batch,
    lanes_through,
    request_lane,
)
from service.batching.types import ItemT
from service.config import Settings
from service.metrics import Metrics
from service.queueing.base import (
    BackendUnavailableError,
    DeadlineExceededError,
    InferenceFailedError,
    InferenceQueue,
    QueueFullError,
    load_refusal,
    results_of,
    updated_pace,
)
from service.runtime.runner import ModelRunner

log = logging.getLogger(__name__)


class BatchRunner(Protocol):
    """What running a batch needs of a model (:class:`ModelRunner`; a worker's runner)."""

    name: str

    def run_batch(self, items: Sequence[WorkItem]) -> list[dict[str, np.ndarray]]: ...


@dataclass(frozen=True)
class BatchRecord:
    """One batch that ran (test and debugging hook: ``InProcessQueue.batch_log``)."""

    model: str
    bucket: int
    lane: str
    item_ids: tuple[str, ...]
    lengths: tuple[int, ...]
    seconds: float

    @property
    def size(self) -> int:
        return len(self.item_ids)


def run_batch_isolating(
    runner: BatchRunner, batch: Sequence[WorkItem]
) -> list[dict[str, np.ndarray] | Exception]:
    """Run ``batch``; if it fails, rerun each item alone so one bad input fails alone.

    Returns per item either its outputs or the exception it failed with. Synchronous: call it
    on an executor thread (workers reuse it too).
    """
    try:
        return _finite_or_error(runner, batch, runner.run_batch(batch))
    except Exception as e:
        if len(batch) == 1:
            log.warning(
                "%s: inference failed on item %s: %s",
                runner.name,
                batch[0].id,
                e,
                extra={"model": runner.name, **batch[0].log_fields()},
            )
            return [e]
        log.warning("%s: batch of %d failed (%s); retrying items alone", runner.name, len(batch), e)
    out: list[dict[str, np.ndarray] | Exception] = []
    for it in batch:
        try:
            out.extend(_finite_or_error(runner, [it], runner.run_batch([it])))
        except Exception as e:
            log.warning(
                "%s: inference failed on item %s: %s",
                runner.name,
                it.id,
                e,
                extra={"model": runner.name, **it.log_fields()},
            )
            out.append(e)
    return out


def run_live_items(
    runner: BatchRunner, batch: list[ItemT], gone: Callable[[ItemT], bool]
) -> list[dict[str, np.ndarray] | Exception | None]:
    """:func:`run_batch_isolating` over the items of ``batch`` not ``gone`` when it starts;
    None in place of the others. A batch formed ahead waits behind the running ones, and its
    requests may pass their deadline or leave meanwhile: running them would only delay the
    requests still waiting. Synchronous: call it on the executor thread that runs the batch."""
    live = [i for i, it in enumerate(batch) if not gone(it)]
    if len(live) == len(batch):  # the common case
        return list(run_batch_isolating(runner, batch))
    out: list[dict[str, np.ndarray] | Exception | None] = [None] * len(batch)
    if live:
        results = run_batch_isolating(runner, [batch[i] for i in live])
        for i, res in zip(live, results, strict=True):
            out[i] = res
    return out


def timed_live_items(
    runner: BatchRunner, batch: list[ItemT], gone: Callable[[ItemT], bool]
) -> tuple[list[dict[str, np.ndarray] | Exception | None], float]:
    """:func:`run_live_items` and its seconds, timed on the executor thread: from dispatch,
    the time would include the wait behind the batch running before it."""
    t0 = time.perf_counter()
    results = run_live_items(runner, batch, gone)
    return results, time.perf_counter() - t0


def _finite_or_error(
    runner: BatchRunner, batch: Sequence[WorkItem], results: Sequence[dict[str, np.ndarray]]
) -> list[dict[str, np.ndarray] | Exception]:
    """An item whose outputs hold NaN or inf fails alone (422 inference_failed): answered,
    they would be "NaN" in a JSON body no client can parse (e.g. an fp16 overflow)."""
    out: list[dict[str, np.ndarray] | Exception] = []
    for it, res in zip(batch, results, strict=True):
        if all(np.isfinite(a).all() for a in res.values() if a.dtype.kind == "f"):
            out.append(res)
        else:
            log.warning(
                "%s: non-finite output for item %s",
                runner.name,
                it.id,
                extra={"model": runner.name, **it.log_fields()},
            )
            out.append(ValueError("the model's output is not a finite number (NaN or inf)"))
    return out


class InProcessQueue(InferenceQueue):
    """Length-bucketed dynamic batching inside the API process.

    One asyncio task per model owns that model's :class:`BucketScheduler`; it takes the next
    ready batch and hands it to the model's own thread executor (never the event loop; one per
    model, so a model's batches never queue behind another's: a flooded model shares the CPU
    with the others, it does not take their turn), which runs it with
    :func:`run_live_items` (the items still wanted, a bad input failing alone); the batch's
    own task resolves the waiting futures. A model has
    at most ``inference_threads`` batches running and ``prefetch_batches`` formed and queued
    behind them; while they run, new requests accumulate, so batches grow with load by
    themselves. A thread that is idle takes pending work at once (a lone request never waits
    for company); only the batch formed ahead waits up to the max wait to fill.

    Items whose future is already done (client gone, deadline hit) are dropped before a batch
    is formed, and again when the batch comes to run (a batch formed ahead waits behind the
    running ones); expired items are failed with :class:`DeadlineExceededError`.
    """

    def __init__(
        self,
        runners: Mapping[str, ModelRunner],
        settings: Settings,
        metrics: Metrics | None = None,
        *,
        batch_log_size: int = 1000,
    ) -> None:
        self.runners = dict(runners)
        self.settings = settings
        self.metrics = metrics
        self.max_depth = settings.max_queue_depth
        # The queue's settings, the runner's measured token cost (it decides the CPU floor).
        self._scheds: dict[str, BucketScheduler[WorkItem]] = {
            name: BucketScheduler(settings.batch_policy(r.provider, r.token_cost_s))
            for name, r in self.runners.items()
        }
        self._threads = {
            name: settings.inference_threads_for(r.provider) for name, r in self.runners.items()
        }
        self._futures: dict[str, asyncio.Future[dict[str, np.ndarray]]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._running: dict[str, int] = dict.fromkeys(self.runners, 0)
        # Per model: seconds of inference per sequence, averaged over its recent batches
        # (absent before its first batch): how long its queue takes to drain.
        self._seq_cost: dict[str, float] = {}
        self._executors: dict[str, ThreadPoolExecutor] = {}
        self._closing = False
        self._started = False
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        # Test/debug hook: the batches that ran, in the order they finished (a model may run
        # several at once, so that is not always the order they were formed in).
        self.batch_log: deque[BatchRecord] = deque(maxlen=batch_log_size)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._started:
            return
        # One per model: with a pool shared by all, a batch of a cheap model queued behind the
        # batches another model's flood had formed ahead (FIFO), and waited for them to run.
        for name, threads in self._threads.items():
            self._executors[name] = ThreadPoolExecutor(
                max_workers=threads, thread_name_prefix=f"nlpserve-infer-{name}"
            )
        for name in self.runners:
            self._wake[name] = asyncio.Event()
            self._tasks[name] = asyncio.create_task(self._loop(name), name=f"batcher-{name}")
        self._started = True

    async def close(self, drain_timeout_s: float = 10.0) -> None:
        """Refuse new work, run everything already queued (without waiting for batches to
        fill), then stop; whatever is left after ``drain_timeout_s`` fails with 503."""
        if not self._started:
            return
        self._closing = True
        self._unpaused.set()
        for ev in self._wake.values():
            ev.set()
        tasks = list(self._tasks.values())
        _, pending = await asyncio.wait(tasks, timeout=drain_timeout_s) if tasks else ((), ())
        for t in pending:
            t.cancel()
        for t in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for fut in self._futures.values():
            if not fut.done():
                fut.set_exception(BackendUnavailableError("the service is shutting down"))
        self._futures.clear()
        for executor in self._executors.values():
            executor.shutdown(wait=False, cancel_futures=True)
        self._executors.clear()
        self._started = False

    # ------------------------------------------------------------------ submitting
    async def submit(self, item: WorkItem) -> dict[str, np.ndarray]:
        return (await self.submit_many([item]))[0]

    async def submit_many(self, items: list[WorkItem]) -> list[dict[str, np.ndarray]]:
        """Queue all of ``items`` or none of them (a request is never half-admitted)."""
        if not items:
            return []
        if self._closing or not self._started:
            raise BackendUnavailableError("the service is shutting down")
        now = time.monotonic()
        deadline = min(it.deadline for it in items)
        # Lanes run in priority order: only its own and higher lanes are ahead of a request.
        lane = request_lane([it.lane for it in items])
        for model in {it.model for it in items}:
            if model not in self._scheds:
                raise KeyError(f"model {model!r} is not loaded")
            if self._tasks[model].done():  # the batch loop died (a bug): fail fast, not hang
                raise BackendUnavailableError(f"the batcher of {model!r} is not running")
            n = sum(1 for it in items if it.model == model)
            if (refused := self.refuse(model, n, deadline, lane)) is not None:
                raise refused
        if deadline <= now:
            raise DeadlineExceededError("the request's deadline passed before it was queued")

        loop = asyncio.get_running_loop()
        futures = []
        for it in items:
            fut: asyncio.Future[dict[str, np.ndarray]] = loop.create_future()
            self._futures[it.id] = fut
            futures.append(fut)
            self._scheds[it.model].add(it)
        for model in {it.model for it in items}:
            self._update_depth(model)
            self._wake[model].set()
        try:
            async with asyncio.timeout(deadline - now):
                return await results_of(futures)
        except TimeoutError:
            raise DeadlineExceededError(
                "not served before the request deadline "
                f"({(deadline - now) * 1000:.0f} ms were left when it was queued)"
            ) from None
        finally:
            # Cancelling (client gone, deadline) marks queued items so no batch runs them.
            for it, fut in zip(items, futures, strict=True):
                if not fut.done():
                    fut.cancel()
                self._futures.pop(it.id, None)

    def refuse(
        self, model: str, n: int, deadline: float, lane: str | None = PREDICT_LANE
    ) -> QueueFullError | None:
        """Why ``n`` more sequences of ``model`` would be refused now (429), else None
        (:func:`~service.queueing.base.load_refusal`): ahead of them are the batches running
        (and formed to run next), then what is queued in ``lane`` and the lanes before it
        (an interactive prediction counts no batch-priority work or explanation)."""
        sched = self._scheds.get(model)
        if sched is None:
            return None
        depth = len(sched)
        queued = sched.depth(lanes=lanes_through(lane))
        return load_refusal(
            model,
            n,
            deadline,
            depth=depth,
            limit=self.max_depth,
            ahead=self._running[model] + queued,
            seq_s=self.drain_s(model, 1),
            retry_after=lambda: self._retry_after(model),
        )

    def drain_s(self, model: str, sequences: int | None = None) -> float | None:
        """Seconds ``model`` takes to run ``sequences`` (default: all it has queued) at the
        pace of its recent batches on all its threads; None before its first batch."""
        cost = self._seq_cost.get(model)
        if cost is None:
            return None
        n = len(self._scheds[model]) if sequences is None else sequences
        return cost * n / self._threads[model]

    def _retry_after(self, model: str) -> float:
        # Time to drain the queue at the recent pace, at least one second.
        return max(1.0, math.ceil(self.drain_s(model) or 0.0))

    # ------------------------------------------------------------------ status
    async def is_ready(self) -> bool:
        return (
            self._started and not self._closing and all(not t.done() for t in self._tasks.values())
        )

    def depth(self, model: str) -> int:
        s = self._scheds.get(model)
        return len(s) if s is not None else 0

    @property
    def waiting(self) -> int:
        """Submitted sequences whose result has not been delivered yet (queued or running)."""
        return len(self._futures)

    def in_flight(self, model: str) -> int:
        """Sequences of ``model`` in batches handed to the executor (running or queued)."""
        return self._running.get(model, 0)

    # ------------------------------------------------------------------ test hooks
    def pause(self) -> None:
        """Stop starting new batches (queued work waits). For tests: fill a bucket, then
        :meth:`resume`, and the batches formed are deterministic, not timing-dependent."""
        self._unpaused.clear()

    def resume(self) -> None:
        self._unpaused.set()
        for ev in self._wake.values():
            ev.set()

    # ------------------------------------------------------------------ the batch loop
    def _update_depth(self, model: str) -> None:
        if self.metrics is None:
            return
        for bucket, n in self._scheds[model].depths().items():
            self.metrics.child(self.metrics.queue_depth, model, str(bucket)).set(n)
        sched = self._scheds[model]
        for lane in sched.lanes:
            self.metrics.set_lane_depth(model, lane, sched.depth(lane=lane))

    def _left(self, it: WorkItem) -> bool:
        """Nobody waits for it any more (client gone, answered, failed). Also called on the
        executor thread: a dict lookup and a state read, both atomic."""
        fut = self._futures.get(it.id)
        return fut is None or fut.done()

    def _purge(self, model: str, now: float) -> None:
        sched = self._scheds[model]
        dropped = sched.drop(self._left)
        for it in dropped:
            log.debug("%s: skipping item %s: its request is gone", model, it.id)
        expired = sched.drop_expired(now)
        for it in expired:
            fut = self._futures.get(it.id)
            if fut is not None and not fut.done():
                fut.set_exception(DeadlineExceededError("deadline passed while queued"))
        if dropped or expired:  # no batch may follow: the gauge must not keep the dropped
            self._update_depth(model)

    async def _loop(self, model: str) -> None:
        """Form ``model``'s batches and hand them to the executor: up to
        ``inference_threads`` running plus ``prefetch_batches`` queued behind them, so a
        thread that finishes a batch starts the next one without waiting for this loop (the
        event loop may be busy with HTTP work when the batch ends)."""
        sched = self._scheds[model]
        wake = self._wake[model]
        slots = self._threads[model] + self.settings.prefetch_batches
        dispatched: set[asyncio.Task[None]] = set()

        def finished(task: asyncio.Task[None]) -> None:
            dispatched.discard(task)
            wake.set()

        try:
            while True:
                if not self._closing:
                    await self._unpaused.wait()
                if len(dispatched) >= slots:
                    wake.clear()
                    await wake.wait()  # set when a batch finishes (or new work, or close)
                    continue
                now = time.monotonic()
                self._purge(model, now)
                ahead = lane_for_next_batch(len(dispatched), self._threads[model])
                # A thread that is idle takes pending work at once; max wait only holds a
                # batch formed ahead, to queue behind busy threads, open for company.
                idle = len(dispatched) < self._threads[model] and not self.settings.wait_when_idle
                batch = sched.next_batch(now, no_wait=self._closing or idle, lane=ahead)
                if batch is None:
                    if self._closing and not len(sched):
                        if dispatched:
                            await asyncio.wait(set(dispatched))
                        self._update_depth(model)
                        return
                    delay = sched.next_wakeup(now, lane=ahead)
                    wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await wake.wait()
                    continue
                self._update_depth(model)
                for it in batch:
                    if it.reach is not None:
                        it.reach.reached = True
                task = asyncio.create_task(self._run(model, batch))
                dispatched.add(task)
                task.add_done_callback(finished)
        finally:
            for task in dispatched:  # cancelled (close timed out): nobody awaits them now
                task.cancel()

    async def _run(self, model: str, batch: list[WorkItem]) -> None:
        """Run one batch on the executor and resolve its items' futures."""
        runner = self.runners[model]

        def gone(it: WorkItem) -> bool:
            return self._left(it) or it.expired()

        self._running[model] += len(batch)
        try:
            results, seconds = await asyncio.get_running_loop().run_in_executor(
                self._executors[model], timed_live_items, runner, batch, gone
            )
        except Exception as e:  # executor shut down, or a bug: fail the batch, keep going
            log.exception("%s: batch failed", model)
            results, seconds = [e] * len(batch), 0.0
        finally:
            self._running[model] -= len(batch)
        ran = [it for it, res in zip(batch, results, strict=True) if res is not None]
        if (pace := updated_pace(self._seq_cost.get(model), seconds, len(ran))) is not None:
            self._seq_cost[model] = pace
        if ran:
            self.batch_log.append(
                BatchRecord(
                    model,
                    ran[0].bucket,
                    ran[0].lane,
                    tuple(it.id for it in ran),
                    tuple(it.length for it in ran),
                    seconds,
                )
            )
        for it, res in zip(batch, results, strict=True):
            fut = self._futures.get(it.id)
            if fut is None or fut.done():
                continue  # timed out or cancelled while running: nobody waits
            if res is None:  # skipped: its deadline passed while the batch waited to run
                fut.set_exception(DeadlineExceededError("deadline passed while queued"))
            elif isinstance(res, Exception):
                fut.set_exception(
                    InferenceFailedError(f"the model could not process this input: {res}", it.id)
                )
            else:
                it.run_s = seconds
                fut.set_result(res)

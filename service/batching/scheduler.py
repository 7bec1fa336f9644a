"""Choosing the next batch of one model among its pending length buckets and lanes.

Shared by every queue backend: the in-process queue and the Redis worker both feed a
:class:`BucketScheduler` and ask it which batch to run next and how long to sleep.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Generic

from service.batching.forming import PendingBucket
from service.batching.types import BatchPolicy, ItemT

PREDICT_LANE = "predict"  # interactive predictions (the default priority)
BATCH_LANE = "batch"  # predictions sent with ``X-Priority: batch`` (bulk scoring)
EXPLAIN_LANE = "explain"
# Lanes in priority order: a lane runs only when every lane before it has nothing waiting.
# Batch predictions go before explanations: an explanation is one client waiting, but its
# hundreds of masked variants would hold a bulk job back for as long as they run.
DEFAULT_LANES: tuple[str, ...] = (PREDICT_LANE, BATCH_LANE, EXPLAIN_LANE)


def request_lane(lanes: list[str], order: tuple[str, ...] = DEFAULT_LANES) -> str | None:
    """The lowest-priority lane among a request's sequences' ``lanes`` (None: one unknown
    here): the work that runs before it is what runs before its last sequence."""
    try:
        return max(lanes, key=order.index) if lanes else None
    except ValueError:
        return None


def lanes_through(lane: str | None, order: tuple[str, ...] = DEFAULT_LANES) -> tuple[str, ...]:
    """The lanes whose queued work runs before (or with) ``lane``'s: itself and those of
    higher priority (every lane for None, an unknown one)."""
    if lane not in order:
        return order
    return order[: order.index(lane) + 1]


def lane_for_next_batch(batches_in_flight: int, threads: int) -> str | None:
    """The ``lane`` to pass to :meth:`BucketScheduler.next_batch`: a batch formed while every
    thread is busy (to queue behind them) must be a prediction batch, since an explanation
    queued there would delay the predictions that arrive meanwhile; otherwise any lane."""
    return PREDICT_LANE if batches_in_flight >= threads else None


class BucketScheduler(Generic[ItemT]):
    """Pending sequences of ONE model, in a :class:`PendingBucket` per (bucket, lane).

    Not thread-safe: one owner (an asyncio loop task, or a worker loop) calls every method.

    Rules of :meth:`next_batch`:
    * lanes are strict priorities (``predict``, then ``batch``, then ``explain``): a lane's
      work runs only when no work of a lane before it waits (not even work that is still
      filling its batch), so batch-priority predictions and explanations never delay
      interactive predictions by more than the batches already running (a batch formed
      ahead, to queue behind them, is asked for with ``lane=PREDICT_LANE``: never a lower
      lane's). A lower lane's item starved by a steady higher one waits until its own
      deadline (then 504): never longer;
    * within a lane, among the buckets that are ready (full, or oldest item waited
      ``max_wait_s``, or any pending work when the caller says ``no_wait``), the one whose
      oldest item has waited longest goes first, so a busy bucket cannot starve a quiet one;
    * the batch itself is formed by :meth:`PendingBucket.take` (the oldest sequence and
      those nearest to it in length, max batch size, token budget).
    """

    def __init__(self, policy: BatchPolicy, lanes: tuple[str, ...] = DEFAULT_LANES) -> None:
        self.policy = policy
        self.lanes = lanes
        self._pending: dict[tuple[int, str], PendingBucket[ItemT]] = {}

    # ------------------------------------------------------------------ contents
    def add(self, item: ItemT) -> None:
        if item.lane not in self.lanes:
            raise ValueError(f"unknown lane {item.lane!r} (known: {', '.join(self.lanes)})")
        key = (item.bucket, item.lane)
        pb = self._pending.get(key)
        if pb is None:
            pb = self._pending[key] = PendingBucket()
        pb.add(item)

    def __len__(self) -> int:
        return sum(len(pb) for pb in self._pending.values())

    def depth(
        self, bucket: int | None = None, lane: str | None = None, lanes: tuple[str, ...] = ()
    ) -> int:
        """Waiting sequences (of ``bucket``; of ``lane``, or of any of ``lanes`` if given)."""
        return sum(
            len(pb)
            for (b, ln), pb in self._pending.items()
            if (bucket is None or b == bucket)
            and (lane is None or ln == lane)
            and (not lanes or ln in lanes)
        )

    def depths(self) -> dict[int, int]:
        """Waiting sequences per bucket index (all lanes), including buckets now empty."""
        out: dict[int, int] = {}
        for (b, _), pb in self._pending.items():
            out[b] = out.get(b, 0) + len(pb)
        return out

    def items(self) -> Iterator[ItemT]:
        for pb in self._pending.values():
            yield from pb.items

    # ------------------------------------------------------------------ removal
    def drop_expired(self, now: float | None = None) -> list[ItemT]:
        """Remove and return every waiting item whose deadline has passed."""
        now = time.monotonic() if now is None else now
        dropped: list[ItemT] = []
        for pb in self._pending.values():
            dropped.extend(pb.drop_expired(now))
        return dropped

    def drop(self, predicate: Callable[[ItemT], bool]) -> list[ItemT]:
        """Remove and return waiting items matching ``predicate`` (e.g. client gone)."""
        dropped: list[ItemT] = []
        for pb in self._pending.values():
            if any(predicate(it) for it in pb.items):
                keep = type(pb.items)()
                for it in pb.items:
                    (dropped if predicate(it) else keep).append(it)
                pb.items = keep
        return dropped

    # ------------------------------------------------------------------ choosing
    def _active_lane(self) -> str | None:
        for lane in self.lanes:
            if any(len(pb) for (_, ln), pb in self._pending.items() if ln == lane):
                return lane
        return None

    def next_batch(
        self, now: float | None = None, *, no_wait: bool = False, lane: str | None = None
    ) -> list[ItemT] | None:
        """Pop the batch to run now, or ``None`` when no bucket is ready.

        ``no_wait=True`` treats every non-empty bucket as ready: an inference thread is idle
        (waiting for company would only leave it idle), or the queue drains at shutdown;
        ``lane`` returns a batch only if that lane is the one whose turn it is.
        """
        active = self._active_lane()
        if active is None or (lane is not None and active != lane):
            return None
        lane = active
        now = time.monotonic() if now is None else now
        best: PendingBucket[ItemT] | None = None
        best_wait = -1.0
        for (_, ln), pb in self._pending.items():
            if ln != lane or not pb.items:
                continue
            if not no_wait and not pb.ready(self.policy, now):
                continue
            wait = pb.oldest_wait(now)
            if wait > best_wait:
                best, best_wait = pb, wait
        return best.take(self.policy) if best is not None else None

    def next_wakeup(self, now: float | None = None, *, lane: str | None = None) -> float | None:
        """Seconds until :meth:`next_batch` (with the same ``lane``) may return a batch
        (0 = now; None = empty, or not ``lane``'s turn: only new work can change that)."""
        active = self._active_lane()
        if active is None or (lane is not None and active != lane):
            return None
        lane = active
        now = time.monotonic() if now is None else now
        waits = [
            pb.time_to_ready(self.policy, now)
            for (_, ln), pb in self._pending.items()
            if ln == lane and pb.items
        ]
        return min(w for w in waits if w is not None)

    def oldest_deadline(self) -> float | None:
        """Earliest deadline among waiting items (a loop may want to wake up to expire it)."""
        return min((it.deadline for it in self.items()), default=None)

"""How late this process's event loop runs: ``nlpserve_event_loop_lag_seconds`` and
``nlpserve_event_loop_lag_max_seconds`` (docs/service.md, "Metrics").

A request waiting for a busy loop (HTTP parsing, JSON, validation, tokenizing, decoding of
the requests ahead of it) waits before any handler starts, so no latency histogram measured
inside one shows it. One task per process sleeps a fixed interval and records how much later
than asked it woke, the way Node.js services export event-loop delay: on a timer, so it costs
the same at any request rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque

from prometheus_client import Gauge, Histogram

# 10 wake-ups a second cost a few µs each; a stall shorter than the interval may fall
# between two wake-ups, and one longer is measured to within the interval (a stall of d
# seconds shows as a lag of at least d - INTERVAL_S).
INTERVAL_S = 0.1
# The gauge holds the largest lag of the last WINDOW_S: longer than two scrapes at the
# deployed 15-s interval, so every stall is in at least one scrape, a missed scrape included.
WINDOW_S = 30.0


class LoopLagMonitor:
    """Measures the running loop's lag into ``histogram`` (every wake-up) and ``gauge`` (the
    largest lag of the last ``window_s``, read at each scrape). :meth:`start` on the loop,
    ``await`` :meth:`stop` on it before the loop closes."""

    def __init__(self, histogram: Histogram, gauge: Gauge, window_s: float = WINDOW_S) -> None:
        self._histogram = histogram
        self._window_s = window_s
        # Sliding-window maximum: (time, lag) with lags decreasing from the front, so the
        # front is the window's largest lag (each sample enters and leaves once).
        self._peaks: deque[tuple[float, float]] = deque()
        self._window_max = 0.0
        self._due = math.inf  # when the current sleep should end (inf: not sleeping)
        self._task: asyncio.Task[None] | None = None
        gauge.set_function(self.max_lag)

    def max_lag(self) -> float:
        """The window's largest lag, or the current one while the loop is late right now:
        a scrape from another thread (the worker's metrics server) sees a stuck loop."""
        return max(self._window_max, time.monotonic() - self._due)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="event-loop-lag")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._due = math.inf

    async def _run(self) -> None:
        while True:
            self._due = time.monotonic() + INTERVAL_S
            await asyncio.sleep(INTERVAL_S)
            now = time.monotonic()
            # uvloop's timers have 1-ms resolution: a wake-up may come a hair early
            lag = max(0.0, now - self._due)
            self._due = math.inf
            self._histogram.observe(lag)
            while self._peaks and self._peaks[-1][1] <= lag:
                self._peaks.pop()
            self._peaks.append((now, lag))
            while self._peaks[0][0] < now - self._window_s:
                self._peaks.popleft()
            self._window_max = self._peaks[0][1]

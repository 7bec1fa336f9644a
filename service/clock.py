"""The clocks nlpserve reads, and the Redis server's clock as every process sees it.

* Inside a process, deadlines, enqueue times and durations are on ``time.monotonic()``. An
  NTP step (or ``date -s``) moves the wall clock, not that one: a step can neither expire
  queued requests at once nor strand them behind a wait that now looks negative.
* Times that another process reads (a work entry's deadline and enqueue time, heartbeats,
  paces, a dead letter's ``dead_at``) are Unix seconds on the Redis server's clock: the one
  clock every replica and worker can read, however far their hosts' clocks are apart.
  :class:`RedisClock` converts between the two.

docs/scale-out.md, "Clocks", says what a deployment needs and how to see a skew.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from redis.exceptions import NoPermissionError

log = logging.getLogger(__name__)

# A host whose wall clock is this far from Redis' is logged: serving is unaffected, but its
# log lines and any Unix time it reports are off by as much (its NTP is broken).
CLOCK_WARN_S = 1.0
# The estimate is the sample with the shortest round trip among the last few (NTP's clock
# filter): one delayed by a busy event loop or a slow network weighs nothing.
SAMPLES = 8


class RedisClock:
    """Estimates ``Redis TIME - time.monotonic()`` of this process from ``TIME`` round trips.

    A sample taken ``sent`` .. ``received`` (monotonic) bounds the offset to within half its
    round trip of ``server time - midpoint``. The estimate keeps the tightest recent sample;
    a sample whose bounds exclude it means the Redis server's clock stepped, and replaces
    the others at once. Until the first sample, and for good where the user may not run
    ``TIME`` (:attr:`denied`), this host's wall clock stands in, read when used: an NTP step
    after the start moves it, as it moved ``time.time()`` in the releases before.
    """

    def __init__(self, who: str) -> None:
        self.who = who  # "worker <name>", "replica <id>": whose clock a log line speaks of
        self._offset = 0.0  # from the samples, once there is one
        self._samples: deque[tuple[float, float]] = deque(maxlen=SAMPLES)  # (offset, error)
        self.measured = False
        # The Redis user may not run TIME (an ACL rule written before nlpserve read Redis'
        # clock, with +ping instead): this host's wall clock stands in, as it did then, so
        # a rolling upgrade keeps serving before the rule gains +time.
        self.denied = False
        self._warned: float | None = None  # the skew last warned of (None: within bounds)

    @property
    def offset(self) -> float:
        """Seconds to add to this process's monotonic time to get Redis' Unix time."""
        if not self._samples:  # this host's wall clock stands in: as it is now, not at start
            return time.time() - time.monotonic()
        return self._offset

    def now(self) -> float:
        """The Redis server's Unix time now, as estimated here."""
        return time.monotonic() + self.offset

    def skew(self) -> float:
        """Seconds the Redis server's clock is ahead of this host's wall clock (negative:
        behind). Informational: nothing here compares this host's wall clock with another's."""
        return self.now() - time.time()

    def record(self, sent: float, server_time: Sequence[Any], received: float) -> None:
        """Take one sample: ``server_time`` is ``TIME``'s (seconds, microseconds), asked at
        monotonic ``sent`` and answered at ``received``."""
        secs, usecs = server_time
        error = max(0.0, received - sent) / 2
        offset = int(secs) + int(usecs) / 1e6 - (sent + error)
        if self._samples and not any(abs(offset - o) <= error + e for o, e in self._samples):
            self._samples.clear()  # the server's clock stepped: older samples are wrong
        self._samples.append((offset, error))
        self._offset = min(self._samples, key=lambda s: s[1])[0]
        self.measured = True
        self._report()

    async def sync(self, client: Any) -> None:
        """One ``TIME`` round trip on ``client`` (a ``redis.asyncio.Redis``); a ping where
        the user may not run ``TIME`` (:attr:`denied`)."""
        if self.denied:
            await client.ping()
            return
        sent = time.monotonic()
        try:
            server_time = await client.time()
        except NoPermissionError:
            self._deny()
            await client.ping()  # still the health probe's round trip
            return
        self.record(sent, server_time, time.monotonic())

    def _deny(self) -> None:
        """The user may not run ``TIME`` (at start, or the rule lost ``+time`` since): this
        host's wall clock stands in from now on."""
        warned, self.denied, self.measured = self.denied, True, True
        self._samples.clear()  # offset: the wall clock's, as it is when read
        if not warned:  # a worker's first read and first beat may both have asked
            self._warn_denied()

    def _warn_denied(self) -> None:
        log.warning(
            "%s: the Redis user may not run TIME (an ACL rule without +time, written "
            "before nlpserve read Redis' clock): times that cross hosts are on each "
            "host's wall clock, so skewed hosts drop or keep work wrongly; add +time to "
            "the rule (docs/deploy.md) and restart",
            self.who,
        )

    def sample(self, pipe: Any) -> None:
        """Queue this clock's sample as ``pipe``'s next command (``TIME``, or ``PING`` where
        denied); :meth:`take` reads its reply."""
        if self.denied:
            pipe.ping()
        else:
            pipe.time()

    def take(self, sent: float, reply: Any, received: float) -> None:
        """Read :meth:`sample`'s reply (a pipeline run with ``raise_on_error=False``): a
        refused ``TIME`` (the rule lost ``+time`` while this process ran) turns to the
        fallback, as at start; other errors are the caller's."""
        if isinstance(reply, NoPermissionError):
            self._deny()
        elif not self.denied and not isinstance(reply, Exception):
            self.record(sent, reply, received)

    @staticmethod
    def errors(replies: Sequence[Any]) -> list[Exception]:
        """The errors among a pipeline's replies whose first was :meth:`sample`'s, less a
        refused ``TIME`` (:meth:`take` handles that one)."""
        return [
            r
            for i, r in enumerate(replies)
            if isinstance(r, Exception) and not (i == 0 and isinstance(r, NoPermissionError))
        ]

    def _report(self) -> None:
        skew = self.skew()
        if abs(skew) >= CLOCK_WARN_S:
            if self._warned is None or abs(skew - self._warned) >= CLOCK_WARN_S:
                self._warned = skew
                log.warning(
                    "%s: this host's wall clock is %.1f s %s the Redis server's (fix its "
                    "NTP): serving is unaffected, since times that cross hosts are on Redis' "
                    "clock, but this host's log times are off by as much "
                    "(nlpserve_clock_offset_seconds)",
                    self.who,
                    abs(skew),
                    "behind" if skew > 0 else "ahead of",
                )
        elif self._warned is not None:
            self._warned = None
            log.info("%s: this host's wall clock is within %.1f s of Redis'", self.who, skew)

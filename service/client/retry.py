"""How a well-behaved client retries (docs/deploy.md, "How clients should call it"): the one
implementation, used by :mod:`service.client` and by the load generator (bench/loadgen.py).

Predictions are pure functions of their input, so every request of the API is safe to repeat.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field


@dataclass
class RetryPolicy:
    """Retries on no answer (connection refused or reset, a timeout) and on
    ``retry_statuses``: ``Retry-After`` when the answer has one, else exponential backoff
    with jitter; at most ``retries`` retries and ``max_total_s`` in all. Other answers (a 4xx
    is the input's fault; a 504 means the deadline passed) are never retried: add 504 to
    ``retry_statuses`` only where the caller still waits past the request's deadline."""

    retries: int = 2  # extra attempts after the first
    backoff_s: float = 0.05  # first backoff; doubles each attempt, with jitter
    max_backoff_s: float = 2.0
    # No retry whose wait would end later than this after the first send (None: no cap but
    # the call's deadline, if any).
    max_total_s: float | None = 30.0
    retry_statuses: frozenset[int] = field(default_factory=lambda: frozenset({429, 502, 503}))

    def delay(self, attempt: int, retry_after: str | None) -> float:
        """Seconds to wait before retry ``attempt + 1`` (0 is the first retry)."""
        if retry_after:
            # In seconds (the service never sends the HTTP-date form), and not shortened: a
            # wait too long for the caller is no retry at all (next_delay's caps).
            try:
                seconds = float(retry_after)
            except ValueError:
                seconds = math.nan
            if math.isfinite(seconds):
                return max(0.0, seconds)
        base = min(self.backoff_s * (2**attempt), self.max_backoff_s)
        return base * (0.5 + random.random())  # jitter: retries of many clients spread out

    def retryable(self, status: int | None) -> bool:
        """Whether an attempt that ended so may be repeated (``None``: no HTTP answer)."""
        return status is None or status in self.retry_statuses

    def next_delay(
        self,
        attempt: int,
        status: int | None,
        retry_after: str | None,
        elapsed_s: float,
        budget_s: float | None = None,
    ) -> float | None:
        """The wait before retrying attempt ``attempt`` (0: the first send), which ended with
        ``status`` (``None``: no answer) ``elapsed_s`` after the first send; None when it is
        not to be retried: not retryable, no retries left, or the retry would start past
        ``max_total_s`` or ``budget_s`` (the call's own deadline)."""
        if not self.retryable(status) or attempt >= self.retries:
            return None
        wait = self.delay(attempt, retry_after)
        for limit in (self.max_total_s, budget_s):
            if limit is not None and elapsed_s + wait >= limit:
                return None
        return wait

"""Each client's rate limit: at most ``NLPSERVE_CLIENT_RATE`` items a second sustained, in
bursts of up to ``NLPSERVE_CLIENT_BURST`` (docs/deploy.md, "Fairness between clients"), or the
client's own ``rate=R burst=B`` of the keys file. In Redis mode one bucket per client is shared
by every API replica (``NLPSERVE_CLIENT_QUOTA_SCOPE=global``: in Redis,
service/queueing/redis_client_counts.py), else it is this API process's.

The in-flight limit (service/api/client_quota.py) bounds how much a client has running at
once, not how much it sends over an hour: a client answered fast may keep the models busy
with a limit of 1. This one is a token bucket per client: it holds up to ``burst`` tokens and
gains ``rate`` a second; a request of n items takes n or is refused 429 ``client_rate``, with
the Retry-After after which n are there. Items are those the models run, as for the in-flight
limit: the response cache's answers cost nothing (they take no model time, which is what the
limit shares out), and a request that ended before any of its items reached a model gets its
tokens back (:meth:`ClientRate.refund`).
"""

from __future__ import annotations

import asyncio
import math
import time

from prometheus_client import Counter, Gauge

from service.api.auth import RATE, ApiKeys, KeyFile, Rate, default_burst
from service.api.client_quota import cached_note
from service.api.errors import LIMIT_BURST, LIMIT_RATE, ApiError, Limit, retry_after_header
from service.config import Settings
from service.metrics import Metrics
from service.queueing.base import SharedRate

SETTING = "NLPSERVE_CLIENT_RATE"
BURST_SETTING = "NLPSERVE_CLIENT_BURST"


class ClientRateConfigError(ValueError):
    """A rate without a keys file (no client to limit), or a burst without a rate."""


def check_settings(settings: Settings) -> None:
    """Raise ClientRateConfigError (one line, naming the settings) for NLPSERVE_CLIENT_RATE
    without NLPSERVE_API_KEYS_FILE, or NLPSERVE_CLIENT_BURST without NLPSERVE_CLIENT_RATE."""
    if settings.client_rate is not None and settings.api_keys_file is None:
        raise ClientRateConfigError(
            f"{SETTING} limits each client, and clients are known only by their API key: "
            "set NLPSERVE_API_KEYS_FILE too (docs/deploy.md, Authentication), or unset it"
        )
    if settings.client_burst is not None and settings.client_rate is None:
        raise ClientRateConfigError(
            f"{BURST_SETTING} is the burst of {SETTING}'s rate: set {SETTING} too, or unset "
            "it (a client's own burst=B goes with its rate=R in the keys file)"
        )


def default_rate(settings: Settings) -> Rate | None:
    """NLPSERVE_CLIENT_RATE with its burst (NLPSERVE_CLIENT_BURST, else one second's items)."""
    if settings.client_rate is None:
        return None
    burst = settings.client_burst or default_burst(settings.client_rate)
    return Rate(settings.client_rate, burst)


def rates_in_force(file: KeyFile, default: Rate | None) -> dict[str, Rate]:
    """Each client's rate limit: its ``rate=R burst=B``, else ``default``
    (:func:`default_rate`); a client without one is left out. ``nlpserve keys check`` prints
    these."""
    rates: dict[str, Rate] = {}
    for name in file.clients:
        rate = file.rates.get(name, default)
        if rate is not None:
            rates[name] = rate
    return rates


def refill(tokens: float, last: float, now: float, rate: Rate) -> float:
    """The tokens a bucket holds at ``now`` that held ``tokens`` at ``last``: never more
    than the burst (a lowered one too)."""
    return min(float(rate.burst), tokens + max(0.0, now - last) * rate.rate)


class ClientRate:
    """Each client's token bucket, and the admission that takes from it: ``rate=R burst=B``
    of the keys file (``keys``; its reloads change it at once), else ``default``, else
    none."""

    def __init__(self, default: Rate | None, keys: ApiKeys, metrics: Metrics) -> None:
        self.default = default
        self.metrics = metrics
        # Where the buckets are kept across replicas (set once the queue has started: Redis
        # mode, NLPSERVE_CLIENT_QUOTA_SCOPE=global); None: here, in ``buckets``.
        self.shared: SharedRate | None = None
        self.buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, monotonic then)
        self.clock = time.monotonic
        self._refunds: set[asyncio.Task[None]] = set()
        # Labels are keys-file names only: bounded, gone with the client's lines.
        self.rate_gauge = Gauge(
            "nlpserve_client_rate",
            f"A client's rate limit in force, items a second: its {RATE} in "
            f"NLPSERVE_API_KEYS_FILE, else {SETTING} (no series: no rate limit).",
            ["client"],
            registry=metrics.registry,
        )
        self.refused = Counter(
            "nlpserve_client_rate_rejections_total",
            f"Requests refused 429 client_rate per client: over {SETTING} or its {RATE}.",
            ["client"],
            registry=metrics.registry,
        )
        self.rates: dict[str, Rate] = {}
        self.own: set[str] = set()  # the clients whose rate is their rate=R
        self.clients: set[str] = set()
        self._keys_changed(keys.file)
        keys.on_change.append(self._keys_changed)

    def _keys_changed(self, file: KeyFile) -> None:
        """The keys file read again: new rates apply to the next request (a bucket keeps
        its tokens, up to a lowered burst); a gone client's bucket and series go."""
        rates = rates_in_force(file, self.default)
        for name in self.clients - file.clients:
            for metric in (self.rate_gauge, self.refused):
                self.metrics.forget(metric, name)
        for name in file.clients:
            if name in rates:
                self.metrics.child(self.rate_gauge, name).set(rates[name].rate)
            else:
                self.metrics.forget(self.rate_gauge, name)
        for name in set(self.buckets) - set(rates):
            del self.buckets[name]
        self.rates, self.own, self.clients = rates, set(file.rates), set(file.clients)

    def _where(self, client: str) -> str:
        # which setting the limit comes from (the message never names the client)
        if client in self.own:
            return f"this client's {RATE} in NLPSERVE_API_KEYS_FILE"
        return SETTING

    def _across(self) -> str:
        return " across the API replicas" if self.shared is not None else ""

    def check(self, client: str, n: int, of: int | None = None) -> None:
        """422 ``too_many_items`` for more items than the client's burst in one request (a
        bucket never holds that many: a retry would be refused again)."""
        rate = self.rates.get(client)
        if rate is not None and n > rate.burst:
            raise ApiError(
                422,
                "too_many_items",
                f"this request needs {n} items run at once{cached_note(n, of)}; this client may "
                f"send at most {rate.burst} at once{self._across()} (the burst of its "
                f"{_spelled(rate)}, {self._where(client)}): send smaller batches",
                limit=Limit(LIMIT_BURST, rate.burst),
            )

    async def take(self, client: str, n: int) -> None:
        """Take ``n`` tokens from the client's bucket, or raise 429 ``client_rate`` (none
        taken). No limit: nothing. Call :meth:`check` first."""
        rate = self.rates.get(client)
        if rate is None or n <= 0:
            return
        if n > rate.burst:
            # a reload lowered the burst since check() (the in-flight admission between them
            # may wait on Redis): a 429 would name a wait after which it is refused again
            self.check(client, n)
        if self.shared is not None:
            taken, before = await self.shared.take(client, n, rate.rate, rate.burst)
        else:
            now = self.clock()
            tokens, last = self.buckets.get(client, (float(rate.burst), now))
            before = refill(tokens, last, now, rate)
            taken = before >= n
            if taken:
                # no await between the check and the take: the event loop runs one at a time
                self.buckets[client] = (before - n, now)
        if not taken:
            raise self._refusal(client, before, n, rate)

    async def refund(self, client: str, n: int) -> None:
        """Give back the ``n`` tokens a request took whose items never reached a model (it
        used no model time), up to the burst; with the rate in force now (none: nothing)."""
        rate = self.rates.get(client)
        if rate is None or n <= 0:
            return
        if self.shared is not None:
            task = asyncio.get_running_loop().create_task(
                self.shared.refund(client, n, rate.rate, rate.burst)
            )
            self._refunds.add(task)  # held until done: the loop keeps only a weak reference
            task.add_done_callback(self._refunds.discard)
            # shielded: a request cancelled (its client gone) gives them back all the same
            await asyncio.shield(task)
            return
        if (bucket := self.buckets.get(client)) is None:
            return  # full: no bucket
        now = self.clock()
        self.buckets[client] = (min(float(rate.burst), refill(*bucket, now, rate) + n), now)

    def _refusal(self, client: str, tokens: float, n: int, rate: Rate) -> ApiError:
        self.metrics.child(self.refused, client).inc()
        wait_s = max(1, math.ceil((n - tokens) / rate.rate))
        return ApiError(
            429,
            "client_rate",
            f"this request needs {n} items and this client may send {_spelled(rate)}"
            f"{self._across()} ({self._where(client)}); it has room for "
            f"{max(0, math.floor(tokens))} now: retry in {wait_s} s",
            retry_after_header(wait_s),
            Limit(LIMIT_RATE, rate.rate),
        )


def _spelled(rate: Rate) -> str:
    return f"{rate.rate:g} items a second, {rate.burst} at most at once"

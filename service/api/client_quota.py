"""Fairness between clients: at most ``NLPSERVE_CLIENT_MAX_IN_FLIGHT`` items per client
admitted and not yet answered, across every model (docs/deploy.md, "Fairness between
clients"), or the client's own ``max_in_flight=N`` of the keys file. In Redis mode they are
counted across every API replica (``NLPSERVE_CLIENT_QUOTA_SCOPE=global``: in Redis,
service/queueing/redis_client_counts.py), else in this API process.

Every client shares each model's queue (NLPSERVE_MAX_QUEUE_DEPTH): without this limit one
client's flood fills it and every other client gets 429 ``queue_full``. With it, the flooding
client alone gets 429 ``client_quota``. Clients are the keys file's names
(NLPSERVE_API_KEYS_FILE, required): an address is no client behind the gateway, where every
request comes from nginx.

With a keys file every client's items are counted (``nlpserve_client_in_flight``), limited or
not: a limit given on a reload then applies at once, and the counts show what a limit would
bound before one is set. A client's limit is its ``max_in_flight`` when the file gives one,
else NLPSERVE_CLIENT_MAX_IN_FLIGHT, else none. Across replicas only the clients with a limit
are counted in Redis (a client counted only costs no round trip); a reload that gives a client
a limit adds the items it has in flight in this process to Redis, so that the new limit
counts them on every replica. ``nlpserve_client_in_flight`` is this process's share of every
client's items either way.

``nlpserve_client_items_total`` counts each client's items admitted past both limits, where
the rate limit charges them: the response cache's answers are not counted, nor a request that
ended before any of its items reached a model (the queue or the task refused it, its client
left, its deadline passed while queued: its tokens are given back).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge

from service.api.auth import MAX_IN_FLIGHT, ApiKeys, KeyFile
from service.api.errors import LIMIT_IN_FLIGHT, ApiError, Limit, retry_after_header
from service.batching.types import REACH, Reach
from service.config import Settings
from service.logs import CLIENT
from service.metrics import Metrics
from service.queueing.base import SharedInFlight

if TYPE_CHECKING:
    from service.api.deps import ServiceState

SETTING = "NLPSERVE_CLIENT_MAX_IN_FLIGHT"
# The client's own items end as they are answered, each within its deadline; a second is
# what a queue_full refusal without a measured pace says too.
RETRY_AFTER_S = 1.0


class ClientQuotaConfigError(ValueError):
    """The limit without a keys file: there would be no client to count for."""


def check_settings(settings: Settings) -> None:
    """Raise ClientQuotaConfigError (one line, naming both settings) for a limit set without
    NLPSERVE_API_KEYS_FILE."""
    if settings.client_max_in_flight is not None and settings.api_keys_file is None:
        raise ClientQuotaConfigError(
            f"{SETTING} limits each client, and clients are known only by their API key: "
            "set NLPSERVE_API_KEYS_FILE too (docs/deploy.md, Authentication), or unset it"
        )


def limits_in_force(file: KeyFile, default: int | None) -> dict[str, int]:
    """Each client's in-flight limit: its ``max_in_flight``, else ``default``
    (NLPSERVE_CLIENT_MAX_IN_FLIGHT); a client without one is left out. ``nlpserve keys
    check`` prints these."""
    limits: dict[str, int] = {}
    for name in file.clients:
        limit = file.limits.get(name, default)
        if limit is not None:
            limits[name] = limit
    return limits


@dataclass(eq=False)
class _Held:
    """One request's items in flight in this process."""

    n: int
    deadline: float
    token: str | None = None  # counted in :attr:`ClientQuota.shared` as this; None: not
    # counted there by a reload, in a task: its release may reach Redis first
    added: bool = False


class ClientQuota:
    """Items in flight per client, and the admission that keeps each under its limit:
    ``max_in_flight`` of the keys file (``keys``; its reloads change it at once), else
    ``default``, else none (counted only)."""

    def __init__(self, default: int | None, keys: ApiKeys, metrics: Metrics) -> None:
        self.default = default
        self.metrics = metrics
        self.in_flight: dict[str, int] = {}  # this process's items of each client
        # Where the limited clients' items count across replicas (set once the queue has
        # started: Redis mode, NLPSERVE_CLIENT_QUOTA_SCOPE=global); None: in this process.
        self.shared: SharedInFlight | None = None
        self._releases: set[asyncio.Task[None]] = set()
        self._held: dict[str, set[_Held]] = {}  # each client's requests in flight here
        # Labels are keys-file names only (AuthMiddleware sets the client): bounded, and a
        # name's series go when its lines leave the file (:meth:`_keys_changed`).
        self.gauge = Gauge(
            "nlpserve_client_in_flight",
            "Items a client has admitted and not yet answered in this API process, across "
            f"models (what {SETTING} or the client's {MAX_IN_FLIGHT} bounds: their sum over "
            "the replicas in Redis mode, NLPSERVE_CLIENT_QUOTA_SCOPE=global).",
            ["client"],
            registry=metrics.registry,
        )
        self.limit_gauge = Gauge(
            "nlpserve_client_max_in_flight",
            f"A client's in-flight limit in force: its {MAX_IN_FLIGHT} in NLPSERVE_API_KEYS_FILE, "
            f"else {SETTING} (no series: no limit).",
            ["client"],
            registry=metrics.registry,
        )
        self.refused = Counter(
            "nlpserve_client_quota_rejections_total",
            f"Requests refused 429 client_quota per client: over {SETTING} or its {MAX_IN_FLIGHT}.",
            ["client"],
            registry=metrics.registry,
        )
        # Counted where the rate limit charges (:func:`admit`), limited or not: use against
        # the rate in force (nlpserve_client_rate), and what a rate= would bound before one
        # is set.
        self.items = Counter(
            "nlpserve_client_items_total",
            "Items a client had admitted past its limits, across models (a batch of N counts "
            "N, an explanation 1), counted as its request ends: what its rate limit charges, so "
            "the response cache's answers are not counted, nor a request that ended before any "
            "of its items reached a model (its tokens are given back).",
            ["client"],
            registry=metrics.registry,
        )
        self.limits: dict[str, int] = {}
        self.own: set[str] = set()  # the clients whose limit is their max_in_flight
        self.clients: set[str] = set()
        self._keys_changed(keys.file)
        keys.on_change.append(self._keys_changed)

    def _keys_changed(self, file: KeyFile) -> None:
        """The keys file read again: new limits apply to the next admission (items already
        in flight stay, even over a lowered limit); a gone client's series go, a new one's
        appear at 0. A client given a limit where it had none: its items in flight here,
        counted in this process only, are added to :attr:`shared`, where every replica's
        next admission of it counts them."""
        limits = limits_in_force(file, self.default)
        if self.shared is not None:
            for name in set(limits).difference(self.limits).intersection(self._held):
                for held in self._held[name]:
                    if held.token is None:
                        held.token, held.added = uuid.uuid4().hex, True
                        self._later(self.shared.add(name, held.token, held.n, held.deadline))
        for name in self.clients - file.clients:
            for metric in (self.gauge, self.limit_gauge, self.refused, self.items):
                self.metrics.forget(metric, name)
        for name in file.clients:
            if name in limits:
                self.metrics.child(self.limit_gauge, name).set(limits[name])
            else:
                self.metrics.forget(self.limit_gauge, name)
            self.metrics.child(self.gauge, name).set(self.in_flight.get(name, 0))
            self.metrics.child(self.items, name)  # from the start at 0: rate() sees the first
        self.limits, self.own, self.clients = limits, set(file.limits), set(file.clients)

    def _where(self, client: str) -> str:
        # which setting the limit comes from (the message never names the client)
        if client in self.own:
            return f"this client's {MAX_IN_FLIGHT} in NLPSERVE_API_KEYS_FILE"
        return SETTING

    def _across(self) -> str:
        return " across the API replicas" if self.shared is not None else ""

    @asynccontextmanager
    async def hold(
        self, client: str, n: int, deadline: float, of: int | None = None
    ) -> AsyncIterator[None]:
        """Count ``n`` items of ``client`` in flight for the block, or raise (nothing held):
        422 ``too_many_items`` for more than its limit in one request (never admitted: a
        retry would be refused again), 429 ``client_quota`` while the client's other
        requests (on any replica, with :attr:`shared`) hold too many. A request is admitted
        whole or not at all, as by the queue. Released however the block ends (answered,
        error, deadline, cancellation). ``deadline`` (``time.monotonic()``): the request's,
        after which (and a margin) its items stop counting across replicas even unreleased.
        ``of``: the request's items when the response cache answers the others (``n`` are
        those run)."""
        limit = self.limits.get(client)
        if limit is not None and n > limit:
            raise ApiError(
                422,
                "too_many_items",
                f"this request needs {n} items run at once{cached_note(n, of)}; this client may "
                f"have at most {limit} in flight{self._across()} ({self._where(client)}): "
                "send smaller batches",
                limit=Limit(LIMIT_IN_FLIGHT, limit),
            )
        shared = self.shared
        mine = _Held(n, deadline)
        if limit is not None and shared is not None:
            mine.token = token = uuid.uuid4().hex
            try:
                admitted, held = await shared.acquire(client, token, n, limit, deadline)
            except asyncio.CancelledError:  # the client gone: the script may run yet
                self._later(shared.release(client, token, n, deadline, answered=False))
                raise
            if not admitted:
                raise self._refusal(client, held, n, limit)
        elif limit is not None and (held := self.in_flight.get(client, 0)) + n > limit:
            raise self._refusal(client, held, n, limit)
        # Counted here alone: no await between the check and the count, the event loop
        # admits one at a time (across replicas the script is the check and the count).
        self._set(client, self.in_flight.get(client, 0) + n)
        self._held.setdefault(client, set()).add(mine)
        try:
            yield
        finally:
            self._set(client, self.in_flight[client] - n)
            self._held[client].discard(mine)
            if not self._held[client]:
                del self._held[client]
            # a token: counted in shared, at admission or since a reload gave a limit
            if shared is not None and mine.token is not None:
                # awaited, so the client's next request finds the room; shielded, so a
                # cancelled request (its client gone, the deadline) still gives it back
                release = shared.release(client, mine.token, n, deadline, answered=not mine.added)
                await asyncio.shield(self._later(release))

    def _refusal(self, client: str, held: int, n: int, limit: int) -> ApiError:
        self.metrics.child(self.refused, client).inc()
        return ApiError(
            429,
            "client_quota",
            f"this client has {held} items in flight{self._across()} and this request needs "
            f"{n} more; the limit for this client is {limit} ({self._where(client)}): retry "
            "once some are answered",
            retry_after_header(RETRY_AFTER_S),
            Limit(LIMIT_IN_FLIGHT, limit),
        )

    def _later(self, call: Coroutine[None, None, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(call)
        self._releases.add(task)  # held until done: the loop keeps only a weak reference
        task.add_done_callback(self._releases.discard)
        return task

    def count(self, client: str, n: int) -> None:
        """Count ``n`` items charged to ``client`` (``nlpserve_client_items_total``)."""
        if client in self.clients:  # a client removed mid-request: no series again
            self.metrics.child(self.items, client).inc(n)

    def _set(self, client: str, n: int) -> None:
        if n:
            self.in_flight[client] = n
        else:
            self.in_flight.pop(client, None)
        # a client removed from the file while its items were in flight: no series again
        if client in self.clients:
            self.metrics.child(self.gauge, client).set(n)


def cached_note(n: int, of: int | None) -> str:
    # the count is of the items run: say so where the request has more (cache hits)
    if of is None or of <= n:
        return ""
    return f" (of its {of}: the response cache answers the rest)"


@asynccontextmanager
async def admit(
    state: ServiceState, n: int, deadline: float, of: int | None = None, refund: bool = True
) -> AsyncIterator[None]:
    """:meth:`ClientQuota.hold` for the client being served (the API key's name, which
    AuthMiddleware and the gRPC server set in ``service.logs.CLIENT``), and the client's rate
    limit (:class:`ClientRate`), where a keys file is on; the items charged are counted
    (``nlpserve_client_items_total``). A no-op without a keys file.

    ``refund``: the block queues the request's items in this task (a prediction), so that
    the queue tells whether any reached a model (:class:`Reach`); if the block ends before
    one did (refused by the queue or the task, the client gone, the deadline passed while
    queued), the tokens are given back and the items not counted: they used no model time,
    which is what the rate limit shares out. An explanation's variants run apart from its
    request: they keep theirs."""
    quota = state.client_quota
    client = CLIENT.get()
    if quota is None or client is None:
        yield
        return
    rate = state.client_rate
    if rate is not None:
        rate.check(client, n, of)  # 422 over the burst: before anything is held
    async with quota.hold(client, n, deadline, of):
        # Tokens are taken once the in-flight admission passed, which is undone exactly: a
        # request refused either way takes no tokens, and one refused here gives its
        # in-flight items back as it leaves the block.
        if rate is not None:
            await rate.take(client, n)
        reach = Reach() if refund else None
        mark = REACH.set(reach)
        try:
            yield
        except BaseException:
            if reach is None or reach.reached:
                quota.count(client, n)
            elif rate is not None:
                await rate.refund(client, n)
            raise
        finally:
            REACH.reset(mark)
        quota.count(client, n)

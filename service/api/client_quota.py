"""Fairness between clients: at most ``NLPSERVE_CLIENT_MAX_IN_FLIGHT`` items per client
admitted and not yet answered, across every model, in this API process (docs/deploy.md,
"Authentication").

Every client shares each model's queue (NLPSERVE_MAX_QUEUE_DEPTH): without this limit one
client's flood fills it and every other client gets 429 ``queue_full``. With it, the flooding
client alone gets 429 ``client_quota``. Clients are the keys file's names
(NLPSERVE_API_KEYS_FILE, required): an address is no client behind the gateway, where every
request comes from nginx.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge

from service.api.errors import ApiError, retry_after_header
from service.config import Settings
from service.logs import CLIENT
from service.metrics import Metrics

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


class ClientQuota:
    """Items in flight per client, and the admission that keeps each under ``limit``."""

    def __init__(self, limit: int, metrics: Metrics) -> None:
        self.limit = limit
        self.metrics = metrics
        self.in_flight: dict[str, int] = {}
        # Labels are keys-file names only (AuthMiddleware sets the client): bounded.
        self.gauge = Gauge(
            "nlpserve_client_in_flight",
            f"Items a client has admitted and not yet answered in this API process (at most "
            f"{SETTING}), across models.",
            ["client"],
            registry=metrics.registry,
        )
        self.refused = Counter(
            "nlpserve_client_quota_rejections_total",
            f"Requests refused 429 client_quota per client: over {SETTING}.",
            ["client"],
            registry=metrics.registry,
        )

    @contextmanager
    def hold(self, client: str, n: int) -> Iterator[None]:
        """Count ``n`` items of ``client`` in flight for the block, or raise (nothing held):
        422 ``too_many_items`` for more than the limit in one request (never admitted: a
        retry would be refused again), 429 ``client_quota`` while the client's other
        requests hold too many. A request is admitted whole or not at all, as by the queue.
        Released however the block ends (answered, error, deadline, cancellation)."""
        if n > self.limit:
            raise ApiError(
                422,
                "too_many_items",
                f"{n} items in one request; a client may have at most {self.limit} in "
                f"flight ({SETTING}): send smaller batches",
            )
        held = self.in_flight.get(client, 0)
        if held + n > self.limit:
            self.metrics.child(self.refused, client).inc()
            raise ApiError(
                429,
                "client_quota",
                f"this client has {held} items in flight and this request needs {n} more; "
                f"the limit per client is {self.limit} ({SETTING}): retry once some are "
                "answered",
                retry_after_header(RETRY_AFTER_S),
            )
        # No await between the check and the count: the event loop admits one at a time.
        self._set(client, held + n)
        try:
            yield
        finally:
            self._set(client, self.in_flight[client] - n)

    def _set(self, client: str, n: int) -> None:
        if n:
            self.in_flight[client] = n
        else:
            self.in_flight.pop(client, None)
        self.metrics.child(self.gauge, client).set(n)


@contextmanager
def admit(state: ServiceState, n: int) -> Iterator[None]:
    """:meth:`ClientQuota.hold` for the client being served (the API key's name, which
    AuthMiddleware and the gRPC server set in ``service.logs.CLIENT``), where the limit is
    on; a no-op otherwise (no limit set)."""
    quota = state.client_quota
    client = CLIENT.get()
    if quota is None or client is None:
        yield
        return
    with quota.hold(client, n):
        yield

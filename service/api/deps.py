"""What routes need from the running service: its state, the model to use, the deadline."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from fastapi import Request

from service.api.errors import ApiError
from service.batching.scheduler import BATCH_LANE, PREDICT_LANE
from service.config import Settings
from service.metrics import Metrics
from service.queueing.base import InferenceQueue
from service.repository.discovery import EVERY_MODEL
from service.tasks.base import Task

if TYPE_CHECKING:  # onnxruntime: a Redis-mode API runs no model and never imports it
    from starlette.types import Scope

    from service.api.auth import ApiKeys
    from service.api.client_quota import ClientQuota
    from service.api.client_rate import ClientRate
    from service.api.response_cache import ResponseCache
    from service.runtime.runner import ModelRunner

T = TypeVar("T")

DEADLINE_HEADER = "X-Deadline-Ms"
PRIORITY_HEADER = "X-Priority"  # gRPC: the x-priority metadata
# A request's priority class -> the batcher's lane its sequences go to (highest first).
PRIORITY_LANES = {"interactive": PREDICT_LANE, "batch": BATCH_LANE}


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    tasks: dict[str, Task] = field(default_factory=dict)  # by model name
    runners: dict[str, ModelRunner] = field(default_factory=dict)  # empty in Redis mode
    queue: InferenceQueue | None = None
    loaded: bool = False
    stopping: bool = False  # the server's (or the lifespan's) shutdown has begun
    # ... as an event: what long-lived calls (gRPC streams) wait on beside their reads
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    # The queue's close, started once by whichever comes first: the server's shutdown
    # (service/server.py) or the lifespan shutdown.
    closing: asyncio.Task[None] | None = None
    # What stopped the startup (a model that cannot load): run_server raises it after
    # uvicorn exits, for the command to report in one line (service/server.py).
    startup_error: Exception | None = None
    api_keys: ApiKeys | None = None  # NLPSERVE_API_KEYS_FILE's clients; None: no auth
    # items in flight per client and their limits (with api_keys); None: no keys file
    client_quota: ClientQuota | None = None
    # each client's token bucket and its rate (with api_keys); None: no keys file
    client_rate: ClientRate | None = None
    response_cache: ResponseCache | None = None  # NLPSERVE_RESPONSE_CACHE_MB; None: off

    def models_of(self, task: str) -> list[str]:
        return sorted(n for n, t in self.tasks.items() if t.task == task)

    def resolve(self, task: str, model: str | None) -> Task:
        """The model serving ``task`` (``model`` picks one when several do)."""
        if model is not None:
            t = self.tasks.get(model)
            if t is None:
                raise ApiError(
                    404,
                    "model_not_found",
                    f"no model named {clip_name(model)} is loaded (loaded: "
                    f"{', '.join(sorted(self.tasks)) or 'none'}; see GET /v1/models)",
                )
            if t.task != task:
                raise ApiError(
                    404,
                    "model_not_found",
                    f"model {model!r} does the {t.task!r} task, not {task!r}",  # a known name
                )
            return t
        names = self.models_of(task)
        if not names:
            selection = self.settings.model_selection()
            # the setting, not its value or the repository's path: clients see this
            where = (
                "this server's NLPSERVE_LOAD_MODELS names none"
                if selection is not None and EVERY_MODEL not in selection
                else "this server's model repository has none"
            )
            raise ApiError(
                404,
                "model_not_loaded",
                f"no {task!r} model is loaded: {where}; loaded: "
                f"{', '.join(sorted(self.tasks)) or 'none'}",
            )
        return self.tasks[names[0]]

    def metrics_label(self, task: str, query: Mapping[str, list[str]]) -> str:
        """Bounded-cardinality model label for a request (never raw client input)."""
        asked = next(iter(query.get("model", ())), None)
        if asked is not None:
            t = self.tasks.get(asked)
            return asked if t is not None and t.task == task else "unknown"
        names = self.models_of(task)
        return names[0] if names else f"none:{task}"


def clip_name(name: str, limit: int = 100) -> str:
    """A client-given name for a message: quoted, and cut (a 60 kB one is not echoed)."""
    return repr(name) if len(name) <= limit else f"{name[:limit]!r}... ({len(name)} characters)"


def check_query(request: Request, allowed: tuple[str, ...] = ("model",)) -> None:
    """Refuse query parameters the endpoint does not read: a client that pins
    ``?version=2`` must not silently get another version's answer (body fields are strict
    for the same reason); and ``model`` given twice is ambiguous."""
    if not request.scope.get("query_string"):
        return
    seen: set[str] = set()
    for key, _ in request.query_params.multi_items():
        if key not in allowed:
            raise ApiError(
                422,
                "unknown_parameter",
                f"unknown query parameter {clip_name(key)}; this endpoint reads: "
                f"{', '.join(allowed)} (a version cannot be chosen per request: each model "
                "serves the one version this server loaded, see GET /v1/models)",
            )
        if key in seen:
            raise ApiError(422, "unknown_parameter", f"query parameter {key!r} given twice")
        seen.add(key)


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


# Digits, with an optional fraction: what the docs promise, not all that float() reads
# ("inf", "1e-300", "1_000").
MILLISECONDS = re.compile(r"[0-9]{1,32}(\.[0-9]{0,32})?")


def deadline_from(request: Request, settings: Settings) -> float:
    """Deadline on ``time.monotonic()``: now + min(X-Deadline-Ms, NLPSERVE_DEFAULT_DEADLINE_MS)."""
    ms = float(settings.default_deadline_ms)
    raw = request.headers.get(DEADLINE_HEADER)
    if raw is not None:
        if len(given_all := request.headers.getlist(DEADLINE_HEADER)) > 1:
            # fields given twice are one list (RFC 9110): "5000, 0" is refused below, where
            # the first one alone was used
            raw = ", ".join(given_all)
        given = raw.strip()
        asked = float(given) if MILLISECONDS.fullmatch(given) else 0.0
        if not asked > 0:
            raise ApiError(
                400,
                "invalid_header",
                f"{DEADLINE_HEADER} must be a positive number of milliseconds (digits, e.g. "
                f"2000 or 2.5), got {raw!r}",
            )
        ms = min(ms, asked)
    return time.monotonic() + ms / 1000.0


def lane_for(state: ServiceState, asked: str | None, client: str | None) -> str:
    """The lane of a prediction whose request asks ``asked`` (X-Priority, or gRPC's
    x-priority; None: not given) for ``client`` (the keys file's name, or None): the request's
    class, else the client's ``priority=`` in the keys file, else interactive. A request may
    lower its class, never raise it above the client's: a batch client's job cannot cut in
    line by sending ``interactive`` (that class is the operator's, in the keys file; such a
    request runs as batch, not refused, so that a job sending the header anyway works)."""
    default = None
    if client is not None and state.api_keys is not None:
        default = state.api_keys.file.priorities.get(client)
    lane = PRIORITY_LANES[default or "interactive"]
    if asked is None:
        return lane
    given = asked.strip().lower()
    if given not in PRIORITY_LANES:
        raise ApiError(
            400,
            "invalid_header",
            f"{PRIORITY_HEADER} must be one of {', '.join(PRIORITY_LANES)}, got {asked[:40]!r}",
        )
    # the lower of the two classes (PRIORITY_LANES is in priority order)
    order = list(PRIORITY_LANES.values())
    return max(lane, PRIORITY_LANES[given], key=order.index)


# ... and back: the class of a lane (the request metrics' priority label)
PRIORITY_OF_LANE = {lane: name for name, lane in PRIORITY_LANES.items()}


def priority_class(state: ServiceState, asked: str | None, client: str | None) -> str:
    """The priority class (``interactive`` or ``batch``) a request is counted under in the
    request metrics: :func:`lane_for`'s, or where ``asked`` is refused (400), the client's
    own. Explanations run in their own lane whatever it says; they are still counted under
    their client's class."""
    try:
        lane = lane_for(state, asked, client)
    except ApiError:
        lane = lane_for(state, None, client)
    return PRIORITY_OF_LANE[lane]


def _asked_priority(scope: Scope) -> tuple[str | None, str | None]:
    """An HTTP request's X-Priority (None: not given; twice is one list, RFC 9110: refused)
    and the client the auth middleware put in its ASGI ``scope``'s state."""
    name = PRIORITY_HEADER.lower().encode()
    given = [v.decode("latin-1") for k, v in scope.get("headers") or () if k == name]
    return (", ".join(given) if given else None), scope.get("state", {}).get("client")


def scope_priority(state: ServiceState, scope: Scope) -> str:
    """:func:`priority_class` of an HTTP request's ASGI ``scope`` (the metrics middleware's)."""
    return priority_class(state, *_asked_priority(scope))


def priority_from(request: Request, state: ServiceState) -> str:
    """:func:`lane_for` of an HTTP request (its X-Priority, its client): the lane it runs in."""
    return lane_for(state, *_asked_priority(request.scope))


class ClientGone(Exception):
    pass


async def _wait_disconnect(request: Request) -> None:
    # After the body is read, receive() only returns when the client disconnects (or the
    # response is complete, after which nobody awaits this).
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it (its queued sequences are
    then skipped by the batcher) and raise :class:`ClientGone`.

    ``work`` runs in the calling task and one watcher task cancels that task on a disconnect:
    one task per request instead of two plus an ``asyncio.wait`` (0.06 ms of event-loop CPU
    per request, about 1% of the 2-core CPU benchmark's throughput).
    """
    current = asyncio.current_task()
    if current is None:  # not in a task: nothing to cancel from the outside
        return await work
    gone = False

    async def watch() -> None:
        nonlocal gone
        await _wait_disconnect(request)
        gone = True
        current.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise  # cancelled from elsewhere (shutdown): not ours to swallow
        current.uncancel()
        raise ClientGone from None
    finally:
        watcher.cancel()

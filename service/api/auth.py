"""Optional client authentication by API key (``NLPSERVE_API_KEYS_FILE``; docs/deploy.md,
"Authentication").

The keys file holds one key per line,
``<client-name> <key-or-hash> [max_in_flight=N] [priority=batch|interactive] [rate=R]
[burst=B]``: the second field is ``sha256:<64 hex>`` (the file then holds no secret) or the key
itself; the optional others, in any order, are the client's own in-flight limit
(service/api/client_quota.py), its predictions' priority (``batch``: they run only when no
interactive prediction waits; a request cannot raise it, see service/api/deps.py) and its own
rate limit (R items a second, bursts of up to B: service/api/client_rate.py). A client may have
several lines (keys being rotated); they must agree on all of them. Requests send
the key as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. The file is read again
when it changes (looked at with one ``stat`` a second, in the background) and on SIGHUP; a
file that no longer parses keeps the keys in force.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import Counter, Gauge
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.errors import ApiError
from service.api.middleware import _send_error
from service.logs import CLIENT
from service.metrics import Metrics

log = logging.getLogger(__name__)

HASH_PREFIX = "sha256:"
MIN_KEY_CHARS = 16
# Client names become a metric label and a log field: short, plain, from the operator's file.
CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")
MAX_IN_FLIGHT = "max_in_flight"  # the key line's optional field: the client's own limit
PRIORITY = "priority"  # ... and the client's predictions' priority class
INTERACTIVE = "interactive"
BATCH = "batch"
PRIORITIES = (INTERACTIVE, BATCH)  # highest first
RATE = "rate"  # ... and the client's own rate limit: items a second
BURST = "burst"  # ... with at most this many at once (default: default_burst(rate))
_LINE = (
    "'<client-name> <key-or-hash> [max_in_flight=N] [priority=batch|interactive] [rate=R] "
    "[burst=B]'"
)
RELOAD_INTERVAL_S = 1.0
REALM = b'Bearer realm="nlpserve"'

# What answers without a key: probes, metrics (protect them on the network), the API docs and
# the demo page with its files (the page asks for a key when the API answers 401).
EXEMPT_PATHS = frozenset(
    {
        "/healthz",
        "/readyz",
        "/v2/health/live",
        "/v2/health/ready",
        "/metrics",
        "/openapi.json",
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
        "/",
    }
)
EXEMPT_PREFIXES = ("/docs-assets/", "/static/")


def is_exempt(path: str) -> bool:
    return path in EXEMPT_PATHS or path.startswith(EXEMPT_PREFIXES)


class KeyFileError(ValueError):
    """A keys file that cannot be used: the message names the file (and line)."""


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def new_key() -> str:
    return secrets.token_urlsafe(32)


def default_burst(rate: float) -> int:
    """A rate's burst when none is given: one second's items, and at least one (a client
    allowed 0.1 items a second sends one every 10 s)."""
    return max(1, math.ceil(rate))


def key_line(
    name: str,
    key: str,
    max_in_flight: int | None = None,
    priority: str | None = None,
    rate: float | None = None,
    burst: int | None = None,
) -> str:
    """The keys file's line for ``name`` holding ``key`` as its hash (and its own limit,
    priority and rate limit)."""
    line = f"{name} {HASH_PREFIX}{digest(key).hex()}"
    if max_in_flight is not None:
        line += f" {MAX_IN_FLIGHT}={max_in_flight}"
    if priority is not None:
        line += f" {PRIORITY}={priority}"
    if rate is not None:
        line += f" {RATE}={rate:g}"
    if burst is not None:
        line += f" {BURST}={burst}"
    return line


@dataclass(frozen=True)
class Rate:
    """A client's rate limit: ``rate`` items a second, at most ``burst`` at once."""

    rate: float
    burst: int

    def __str__(self) -> str:
        return f"{RATE}={self.rate:g} {BURST}={self.burst}"


@dataclass
class KeyFile:
    """What a keys file says: sha256 digest of each key -> its client, the clients that
    carry their own in-flight limit (``max_in_flight=N``) -> N, those that carry a
    priority (``priority=batch|interactive``) -> it, and those with their own rate limit
    (``rate=R [burst=B]``) -> it."""

    keys: dict[bytes, str]
    limits: dict[str, int] = field(default_factory=dict)
    priorities: dict[str, str] = field(default_factory=dict)
    rates: dict[str, Rate] = field(default_factory=dict)

    @property
    def clients(self) -> set[str]:
        return set(self.keys.values())


def _options(fields: list[str], at: str, name: str) -> tuple[int | None, str | None, Rate | None]:
    """(``max_in_flight``, ``priority``, ``rate`` and ``burst``) of a line's optional fields
    (from the third on). A field is never quoted: a key written with a space in it would
    land here."""
    limit: int | None = None
    priority: str | None = None
    rate: float | None = None
    burst: int | None = None
    for column, option in enumerate(fields, 3):
        option_name, eq, value = option.partition("=")
        if eq and option_name == MAX_IN_FLIGHT and limit is None:
            limit = _max_in_flight(value, at, name)
        elif eq and option_name == PRIORITY and priority is None:
            if value not in PRIORITIES:
                raise KeyFileError(
                    f"{at}: client {name!r}: {PRIORITY} is {' or '.join(PRIORITIES)}, "
                    f"got {value[:20]!r}"
                )
            priority = value
        elif eq and option_name == RATE and rate is None:
            rate = _rate(value, at, name)
        elif eq and option_name == BURST and burst is None:
            burst = _burst(value, at, name)
        else:
            raise KeyFileError(
                f"{at}: client {name!r}: field {column} is not {MAX_IN_FLIGHT}=N, "
                f"{PRIORITY}=batch|interactive, {RATE}=R or {BURST}=B, each at most once "
                f"(a line is {_LINE})"
            )
    if burst is not None and rate is None:
        raise KeyFileError(
            f"{at}: client {name!r}: {BURST}=B needs {RATE}=R on the line (the burst is of "
            "that rate)"
        )
    return limit, priority, None if rate is None else Rate(rate, burst or default_burst(rate))


def _rate(value: str, at: str, name: str) -> float:
    """``rate=R``'s R: items a second, a positive finite number (0.1: one every 10 s)."""
    try:
        rate = float(value) if value.isascii() else math.nan
    except ValueError:
        rate = math.nan
    if not (math.isfinite(rate) and rate > 0):
        raise KeyFileError(
            f"{at}: client {name!r}: {RATE} is items a second, a number above 0 (0.1: one "
            "every 10 s; without the field it has NLPSERVE_CLIENT_RATE's)"
        )
    return rate


def _burst(value: str, at: str, name: str) -> int:
    """``burst=B``'s B (1 or more)."""
    if not value.isascii() or not value.isdigit() or int(value) < 1:
        raise KeyFileError(
            f"{at}: client {name!r}: {BURST} is a whole number of items, 1 or more (the most "
            "one request may have; without the field: the rate rounded up, at least 1)"
        )
    return int(value)


def _max_in_flight(value: str, at: str, name: str) -> int:
    """``max_in_flight=N``'s N (1 or more)."""
    if not value.isascii() or not value.isdigit() or int(value) < 1:
        raise KeyFileError(
            f"{at}: client {name!r}: {MAX_IN_FLIGHT} is a whole number of items, 1 or more "
            "(to stop a client, delete its lines; without the field it has "
            "NLPSERVE_CLIENT_MAX_IN_FLIGHT's limit)"
        )
    return int(value)


def _spelled(option: str, value: object) -> str:
    if isinstance(value, Rate):  # burst too: two lines may differ in either
        return str(value)
    return f"{option}={value}" if value is not None else f"no {option}"


def parse_keys(text: str, path: Path | str) -> KeyFile:
    """The file's keys and clients. Raises KeyFileError (``<path>:<line>: why``) on a line that
    is not ``<name> <key-or-hash> [max_in_flight=N] [priority=...]``, a key twice, a plaintext
    key under MIN_KEY_CHARS, two lines of one client that disagree on ``max_in_flight`` or
    ``priority`` or ``rate``/``burst``, or no client at all. Never quotes a key."""
    keys: dict[bytes, str] = {}
    # the client's first line and what it said: its lines must agree (the limit is the
    # client's, counted over all its keys, not a key's)
    first: dict[str, tuple[int, int | None, str | None, Rate | None]] = {}
    where: dict[bytes, int] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        for i in range(2, len(fields)):
            if fields[i].startswith("#"):  # a trailing comment
                fields = fields[:i]
                break
        at = f"{path}:{n}"
        if not 2 <= len(fields) <= 6:
            raise KeyFileError(
                f"{at}: expected {_LINE} (two fields, or up to six), got "
                f"{len(fields)} field{'s' * (len(fields) != 1)}"
            )
        name, secret = fields[:2]
        if not CLIENT_NAME.fullmatch(name):
            raise KeyFileError(
                f"{at}: client name {name[:64]!r} must be 1 to 64 of A-Z a-z 0-9 . _ - "
                "(starting with a letter or digit)"
            )
        if secret.startswith(HASH_PREFIX):
            hexdigest = secret[len(HASH_PREFIX) :]
            if not _HEX_DIGEST.fullmatch(hexdigest):
                raise KeyFileError(
                    f"{at}: client {name!r}: a hash is 'sha256:' and 64 hex digits "
                    "(`nlpserve keys new NAME` prints one)"
                )
            d = bytes.fromhex(hexdigest)
        else:
            if not secret.isascii() or not secret.isprintable():
                raise KeyFileError(
                    f"{at}: client {name!r}: a key is printable ASCII (an HTTP header)"
                )
            if len(secret) < MIN_KEY_CHARS:
                raise KeyFileError(
                    f"{at}: client {name!r}: the key is {len(secret)} characters, shorter "
                    f"than {MIN_KEY_CHARS} (`nlpserve keys new NAME` makes one)"
                )
            d = digest(secret)
        limit, priority, rate = _options(fields[2:], at, name)
        if d in keys:
            raise KeyFileError(
                f"{at}: client {name!r} has the same key as {keys[d]!r} on line {where[d]}"
            )
        if name in first:  # a client's lines must agree: its options are the client's
            line_n, said_limit, said_priority, said_rate = first[name]
            for option, what, here, said in (
                (MAX_IN_FLIGHT, "limit", limit, said_limit),
                (PRIORITY, "priority", priority, said_priority),
                (RATE, "rate limit", rate, said_rate),
            ):
                if here != said:
                    raise KeyFileError(
                        f"{at}: client {name!r} has {_spelled(option, here)} here but "
                        f"{_spelled(option, said)} on line {line_n}: the {what} is the "
                        "client's, over all its keys; give its lines the same one"
                    )
        keys[d] = name
        first.setdefault(name, (n, limit, priority, rate))
        where[d] = n
    if not keys:
        raise KeyFileError(f"{path}: holds no client (lines {_LINE})")
    limits = {name: limit for name, (_, limit, _, _) in first.items() if limit is not None}
    priorities = {name: p for name, (_, _, p, _) in first.items() if p is not None}
    rates = {name: r for name, (_, _, _, r) in first.items() if r is not None}
    return KeyFile(keys, limits, priorities, rates)


def _signature(st: os.stat_result) -> tuple[int, ...]:
    # inode too: a file replaced by rename (an editor, a Kubernetes secret) may keep the size
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


def read_keys(path: Path) -> tuple[KeyFile, tuple[int, ...]]:
    """(its keys and clients, the file's stat signature); KeyFileError when unreadable or
    malformed."""
    try:
        with path.open("rb") as f:
            sig = _signature(os.fstat(f.fileno()))
            data = f.read()
        text = data.decode("utf-8")
    except OSError as e:
        raise KeyFileError(f"{path}: cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise KeyFileError(f"{path}: is not UTF-8 text") from None
    return parse_keys(text, path), sig


class AuthMetrics:
    """The API's authentication series (created only when NLPSERVE_API_KEYS_FILE is set)."""

    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.metrics = metrics
        self.failures = Counter(
            "nlpserve_auth_failures_total",
            "Requests refused 401: reason=missing (no credentials, or not as Bearer / "
            "X-API-Key) or invalid (a key the keys file does not hold).",
            ["reason"],
            registry=r,
        )
        self.client_requests = Counter(
            "nlpserve_client_requests_total",
            "Authenticated requests per client (names from NLPSERVE_API_KEYS_FILE).",
            ["client"],
            registry=r,
        )
        self.keys_loaded = Gauge(
            "nlpserve_api_keys_loaded", "Client keys in force (NLPSERVE_API_KEYS_FILE).", registry=r
        )
        self.reload_failures = Counter(
            "nlpserve_api_keys_reload_failures_total",
            "Re-reads of a changed keys file that failed (malformed or unreadable): the keys "
            "in force before are kept.",
            registry=r,
        )


class ApiKeys:
    """The keys in force, from ``path``: read at creation (KeyFileError if unusable), then
    again when the file's mtime, size or inode change (:meth:`watch`) or on :meth:`reload`.
    ``on_change`` callbacks get each new :class:`KeyFile` once it is in force."""

    def __init__(self, path: Path, metrics: Metrics, interval_s: float = RELOAD_INTERVAL_S) -> None:
        self.path = path
        self.interval_s = interval_s
        self.file, self._sig = read_keys(path)
        self._failed_sig: tuple[int, ...] | None = None
        self.on_change: list[Callable[[KeyFile], None]] = []
        self.metrics = AuthMetrics(metrics)
        self.metrics.keys_loaded.set(len(self.keys))
        log.info(
            "API keys: %d clients (%d keys) from %s", len(self.file.clients), len(self.keys), path
        )

    @property
    def keys(self) -> dict[bytes, str]:
        return self.file.keys

    def lookup(self, key: str) -> str | None:
        """The client holding ``key``, or None. Every stored key is compared, in constant
        time over sha256 digests: how long it takes says nothing about which one is near."""
        d = digest(key)
        found = None
        for stored, name in self.keys.items():
            if hmac.compare_digest(d, stored):
                found = name
        return found

    async def watch(self) -> None:
        """Look for a change of the file every ``interval_s`` (one ``stat``), until
        cancelled: in the background, so the request path does no file I/O and the gauge
        is current with no traffic."""
        while True:
            await asyncio.sleep(self.interval_s)
            self.refresh()

    def refresh(self) -> None:
        """Read the file again if its mtime, size or inode changed since the last read."""
        try:
            sig = _signature(os.stat(self.path))
        except OSError as e:  # gone (mid-rotation?): keep the keys, say so once
            if self._failed_sig != ():
                self._failed(KeyFileError(f"{self.path}: cannot be read: {e.strerror or e}"), ())
            return
        if sig != self._sig and sig != self._failed_sig:
            self.reload()

    def reload(self) -> bool:
        """Read the file now (SIGHUP, or a change seen); keep the keys in force on failure."""
        try:
            keys, sig = read_keys(self.path)
        except KeyFileError as e:
            try:
                failed: tuple[int, ...] = _signature(os.stat(self.path))
            except OSError:
                failed = ()
            self._failed(e, failed)
            return False
        before = self.file
        added = sorted(keys.clients - before.clients)
        removed = sorted(before.clients - keys.clients)
        changed = sorted(
            name
            for name in keys.clients & before.clients
            if keys.limits.get(name) != before.limits.get(name)
            or keys.priorities.get(name) != before.priorities.get(name)
            or keys.rates.get(name) != before.rates.get(name)
        )
        self.file, self._sig, self._failed_sig = keys, sig, None
        self.metrics.keys_loaded.set(len(keys.keys))
        for name in removed:  # the label set follows the file: a gone client's series go
            self.metrics.metrics.forget(self.metrics.client_requests, name)
        for callback in self.on_change:
            callback(keys)
        log.info(
            "API keys reloaded from %s: %d clients, %d keys (added: %s; removed: %s; "
            "max_in_flight, priority or rate changed: %s)",
            self.path,
            len(keys.clients),
            len(keys.keys),
            ", ".join(added) or "none",
            ", ".join(removed) or "none",
            ", ".join(changed) or "none",
        )
        return True

    def _failed(self, error: KeyFileError, sig: tuple[int, ...]) -> None:
        # logged once per version of the file, not at every check
        self._failed_sig = sig
        self.metrics.reload_failures.inc()
        log.error("API keys not reloaded, keeping the %d in force: %s", len(self.keys), error)


def _credentials(headers: list[tuple[bytes, bytes]]) -> tuple[str | None, str]:
    """(the key the request sends, '' or why it sends none usable)."""
    bearer = api_key = None
    for k, v in headers:
        if k == b"authorization":
            bearer = v
        elif k == b"x-api-key":
            api_key = v
    if api_key is not None:
        return api_key.decode("latin-1").strip(), ""
    if bearer is not None:
        scheme, _, token = bearer.decode("latin-1").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None, "the Authorization header is not 'Bearer <key>'"
        return token.strip(), ""
    return None, ""


# nlpserve_auth_failures_total's reason -> the answer's status and error code
REFUSALS = {"missing": (401, "unauthorized"), "invalid": (401, "invalid_api_key")}
_HOW = "send the key as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"


def authenticate(keys: ApiKeys, headers: list[tuple[bytes, bytes]]) -> str | ApiError:
    """The client whose key ``headers`` send (lower-case names: HTTP's, gRPC's metadata),
    or the 401 to answer; counted either way (``nlpserve_auth_*``)."""
    key, why = _credentials(headers)
    name = keys.lookup(key) if key else None
    if name is None:
        reason = "invalid" if key else "missing"
        status, code = REFUSALS[reason]
        message = (
            f"invalid API key: {_HOW}" if key else f"this server requires an API key: {why or _HOW}"
        )
        keys.metrics.metrics.child(keys.metrics.failures, reason).inc()
        return ApiError(status, code, message)
    keys.metrics.metrics.child(keys.metrics.client_requests, name).inc()
    return name


def still_held(keys: ApiKeys, headers: list[tuple[bytes, bytes]]) -> str | ApiError:
    """:func:`authenticate` again for a call already admitted (a gRPC stream's each request):
    the client holding its key now, or the 401 (counted) where a reload removed the key.
    A success is not counted again: the call was."""
    key, _ = _credentials(headers)
    name = keys.lookup(key) if key else None
    if name is not None:
        return name
    keys.metrics.metrics.child(keys.metrics.failures, "invalid").inc()
    status, code = REFUSALS["invalid"]
    return ApiError(
        status, code, f"invalid API key: it left the keys file after this call began; {_HOW}"
    )


class AuthMiddleware:
    """401 for a request to a protected path without a key of the keys file; the client's
    name into the request's state (``request.state.client``) and the log context. An
    ``X-API-Key`` header wins over ``Authorization``."""

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # No exemption for OPTIONS: CorsMiddleware (outside) answers a preflight before this
        # one sees it; any other OPTIONS reached the metrics as a model's request (405)
        # without a key.
        if scope["type"] != "http" or is_exempt(scope["path"]):
            await self.app(scope, receive, send)
            return
        found = authenticate(self.keys, scope["headers"])
        if isinstance(found, ApiError):
            rid = scope.get("state", {}).get("request_id")
            log.info(
                "request %s: %s %r refused: %s",  # %r: a path's control characters escaped
                rid or "-",
                scope["method"],
                scope["path"][:200],
                found.code,
                extra={"request_id": rid},
            )
            challenge = [(b"www-authenticate", REALM)]
            await _send_error(scope, send, found.status_code, found.code, found.message, challenge)
            return
        name = found
        scope.setdefault("state", {})["client"] = name
        token = CLIENT.set(name)
        if log.isEnabledFor(logging.DEBUG):
            rid = scope.get("state", {}).get("request_id")
            log.debug("request %s: client %s", rid or "-", name, extra={"request_id": rid})
        try:
            await self.app(scope, receive, send)
        finally:
            CLIENT.reset(token)

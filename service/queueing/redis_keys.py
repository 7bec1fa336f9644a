"""Names and connections shared by the Redis API side and the workers (docs/scale-out.md).

Keys (``P`` = ``NLPSERVE_REDIS_PREFIX``, default ``nlpserve``):

The braces are literal: ``{model}`` is a Redis Cluster hash tag, so all keys of one model
share a slot (the admission script touches all of a model's streams at once).

* ``P:{model}:v{v}:e{h}:b{i}``  work stream of version ``v`` of model ``model`` with bucket
                              edges whose digest is ``h``, length bucket index ``i`` (index
                              into those edges), predict lane. ``v{v}:e{h}`` is the model's
                              *layout*: a replica and a worker that loaded different versions
                              (another vocabulary, other labels) or bucket edges (an index
                              that means another length, or none) never exchange work: it
                              waits for a worker of its own layout.
* ``P:{model}:v{v}:e{h}:b{i}:batch``  the same bucket's batch lane (``X-Priority: batch``
                              predictions; runs only when no predict waits)
* ``P:{model}:v{v}:e{h}:b{i}:explain``  the same bucket's explain lane (runs only when no
                              predict or batch waits)
* ``P:{model}:v{v}:e{h}:workers``  sorted set: worker name -> Unix time (on Redis' clock,
                              service/clock.py) of its last heartbeat, for the workers that
                              serve that layout
* ``P:{model}:v{v}:e{h}:batch-readers``  sorted set like ``...:workers``, of the workers
                              that read the batch lane's streams (a worker of an earlier
                              version does not): while it counts fewer live workers than
                              ``...:workers``, replicas queue batch work in the predict lane
* ``P:{model}:v{v}:e{h}:pace``  hash: worker name -> ``<seconds per sequence> <threads>
                              <Unix time on Redis' clock>``, each worker's recent pace on
                              that layout (from its heartbeat): the replicas' estimate of
                              how long the work queued ahead of a request takes
* ``P:{model}:dead``          dead-letter stream of the model (poison entries, with the error)
* ``P:reply:{replica}``       pub/sub channel of one API replica: every reply for it
* ``P:workers``               sorted set: worker name -> Unix time (Redis' clock) of its last
                              heartbeat
* ``P:cancel``                pub/sub channel: entries whose request gave up (client gone, a
                              failed sibling), for workers that already read them
* ``P:client:{name}:in-flight``  sorted set: one member ``<request id>:<i>`` per item a
                              client (the keys file's ``name``) has admitted and not yet
                              answered on any API replica, scored by when it stops counting
                              (its deadline and a margin, Unix time on Redis' clock): the
                              client's in-flight limit across replicas
                              (``NLPSERVE_CLIENT_QUOTA_SCOPE=global``); expires with its last
                              item
* consumer group ``workers`` on every work stream; consumers are worker processes
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import UnixDomainSocketConnection as UnixSocket
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.credentials import CredentialProvider
from redis.exceptions import ConnectionError as RedisConnectionError

from service.batching.scheduler import BATCH_LANE, DEFAULT_LANES, PREDICT_LANE
from service.config import Settings

GROUP = "workers"


def layout(version: str, edges: Sequence[int]) -> str:
    """``v1:e<8 hex>``: what a replica and a worker must share to exchange a model's work, its
    version and its bucket edges (a stream's bucket index means an edge)."""
    digest = hashlib.sha256(",".join(map(str, edges)).encode()).hexdigest()[:8]
    return f"v{version}:e{digest}"


def work_stream(
    prefix: str, model: str, model_layout: str, bucket: int, lane: str = PREDICT_LANE
) -> str:
    base = f"{prefix}:{{{model}}}:{model_layout}:b{bucket}"
    return base if lane == PREDICT_LANE else f"{base}:{lane}"


def model_streams(
    prefix: str,
    model: str,
    model_layout: str,
    n_buckets: int,
    lanes: tuple[str, ...] = DEFAULT_LANES,
) -> list[str]:
    """Every work stream of ``model`` in ``model_layout`` (:func:`layout`), predict lane
    first."""
    return [
        work_stream(prefix, model, model_layout, b, lane)
        for lane in lanes
        for b in range(n_buckets)
    ]


def stream_labels(stream: str) -> tuple[str, str, str, str]:
    """``P:{model}:v1:e<h>:b3[:explain]`` → (model, "1", "3", lane), whatever ``P`` holds
    (":b" too; a model name or version holds no ``:`` or brace, the digest is hex)."""
    head, _, tail = stream.rpartition("}:v")
    model = head.rpartition(":{")[2]
    layout_, _, rest = tail.partition(":b")
    version = layout_.rpartition(":e")[0]
    bucket, _, lane = rest.partition(":")
    return model, version, bucket, lane or PREDICT_LANE


def model_workers_key(prefix: str, model: str, model_layout: str) -> str:
    return f"{prefix}:{{{model}}}:{model_layout}:workers"


# Lanes a worker of an earlier version does not read (their streams came later). A worker
# that reads one beats in its readers set as well; a replica queues that lane's work in the
# predict lane while a live worker of the layout does not beat there, so a rolling update
# in any order never leaves work in streams that no live worker reads.
ANNOUNCED_LANES: tuple[str, ...] = (BATCH_LANE,)


def lane_readers_key(prefix: str, model: str, model_layout: str, lane: str) -> str:
    return f"{prefix}:{{{model}}}:{model_layout}:{lane}-readers"


def model_pace_key(prefix: str, model: str, model_layout: str) -> str:
    return f"{prefix}:{{{model}}}:{model_layout}:pace"


def encode_pace(seq_s: float, threads: int, at: float) -> bytes:
    """A worker's pace on a model: seconds per sequence on one of its ``threads``, at ``at``."""
    return f"{seq_s!r} {threads} {at!r}".encode()


def decode_pace(data: bytes | str) -> tuple[float, int, float] | None:
    """(seconds per sequence, threads, Unix time) of :func:`encode_pace`; None if malformed."""
    try:
        seq_s, threads, at = (data.decode() if isinstance(data, bytes) else data).split()
        out = float(seq_s), int(threads), float(at)
    except (ValueError, UnicodeDecodeError):
        return None
    # a NaN, infinite or non-positive pace would make every wait estimate NaN or infinite
    ok = math.isfinite(out[0]) and out[0] > 0 and out[1] > 0 and math.isfinite(out[2])
    return out if ok else None


def dead_letter_stream(prefix: str, model: str) -> str:
    return f"{prefix}:{{{model}}}:dead"


def reply_channel(prefix: str, replica: str) -> str:
    return f"{prefix}:reply:{replica}"


def cancel_channel(prefix: str) -> str:
    return f"{prefix}:cancel"


def encode_cancel(entries: list[tuple[str, bytes]]) -> bytes:
    """A cancel message: one ``<stream> <entry id>`` per line (ids hold no space)."""
    return b"\n".join(stream.encode() + b" " + entry_id for stream, entry_id in entries)


def decode_cancel(data: bytes) -> set[tuple[str, bytes]]:
    out = set()
    for line in data.split(b"\n"):
        stream, sep, entry_id = line.rpartition(b" ")
        if sep:
            out.add((stream.decode(), entry_id))
    return out


# A worker beats (refreshes its score in P:workers) every maintenance pass, at most 2 s
# apart: one silent this long is dead or stalled. Scores are each worker's own clock, so
# hosts' clocks must agree to well within this.
WORKER_ALIVE_S = 60.0


def workers_key(prefix: str) -> str:
    return f"{prefix}:workers"


def client_in_flight_key(prefix: str, client: str) -> str:
    # a keys-file name holds no brace or colon (auth.CLIENT_NAME)
    return f"{prefix}:client:{{{client}}}:in-flight"


def client_rate_key(prefix: str, client: str) -> str:
    # the same hash tag as its in-flight set: one cluster slot per client
    return f"{prefix}:client:{{{client}}}:rate"


def client_rate_ids_key(prefix: str, client: str) -> str:
    # the ids of the takes and refunds its bucket ran lately (same slot as the bucket)
    return f"{prefix}:client:{{{client}}}:rate-ids"


class PasswordFileCredentials(CredentialProvider):
    """``NLPSERVE_REDIS_PASSWORD_FILE``: the password read from a file (a mounted secret) at
    each new connection, so a rotated secret is picked up without a restart."""

    def __init__(self, path: Path, username: str | None = None) -> None:
        self.path = path
        self.username = username

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        # A file that cannot be read is a connection error of redis-py's: the connection is
        # dropped and the callers' retry and "unreachable (why)" paths apply. Any other error
        # left older redis-py's socket (5.0.2, pyproject's lowest) open and unauthenticated,
        # for the next command to reuse.
        try:
            text = self.path.read_text("utf-8")
        except OSError as e:
            why = e.strerror or type(e).__name__
            raise RedisConnectionError(f"NLPSERVE_REDIS_PASSWORD_FILE {self.path}: {why}") from None
        except UnicodeDecodeError:  # its message would quote a byte of the password
            raise RedisConnectionError(
                f"NLPSERVE_REDIS_PASSWORD_FILE {self.path}: not UTF-8 text"
            ) from None
        # one trailing newline (`echo secret > file`) is not part of the password
        password = text.removesuffix("\n").removesuffix("\r")
        return (self.username, password) if self.username else (password,)

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        return self.get_credentials()


def connection_options(settings: Settings) -> dict[str, object]:
    """redis-py's connection options from ``NLPSERVE_REDIS_URL`` (TLS: ``rediss://`` and its
    ``ssl_*`` query options) and ``NLPSERVE_REDIS_PASSWORD_FILE``.

    A URL redis-py cannot parse raises a ValueError that quotes no credentials: redis-py's
    own messages may quote a piece of the password.
    """
    try:
        options: dict[str, object] = dict(parse_url(settings.redis_url))
    except ValueError as e:
        # quoted only where the URL holds no credentials it could quote a piece of
        why = "not a URL redis-py accepts" if "@" in settings.redis_url else str(e)
        raise ValueError(f"NLPSERVE_REDIS_URL ({safe_url(settings.redis_url)}): {why}") from None
    if settings.redis_password_file is not None:
        username = options.pop("username", None)
        options.pop("password", None)
        options["credential_provider"] = PasswordFileCredentials(
            settings.redis_password_file, username if isinstance(username, str) else None
        )
    return options


def make_client(
    settings: Settings,
    *,
    blocks_s: float = 0.0,
    retries: int = 1,
    max_connections: int | None = None,
) -> Redis:
    """A client that fails fast when Redis is away.

    Short connect timeout so an unreachable server costs well under a second; one retry so
    the first command after a Redis restart transparently replaces its stale pooled
    connection; a bounded pool so hundreds of concurrent requests share a few sockets (a
    caller waits for a free one without limit: its own deadline bounds the wait, and a busy
    pool is not an unreachable Redis). Options in the URL's query string (TLS's ``ssl_*``,
    or ``socket_timeout``...) win over these defaults, as in redis-py's ``from_url``.
    ``blocks_s``: how long a blocking command of this client (the worker's ``XREADGROUP
    BLOCK``) holds its socket; the read timeout outlasts it, the URL's ``socket_timeout`` too.
    """
    options = connection_options(settings)
    timeout = options.pop("socket_timeout", None)
    if not isinstance(timeout, int | float):
        timeout = settings.redis_socket_timeout_s
    timeout += blocks_s
    defaults: dict[str, object] = {
        "max_connections": max_connections or settings.redis_max_connections,
        "timeout": None,
        "socket_connect_timeout": settings.redis_connect_timeout_s,
        "socket_timeout": timeout,
        "retry": Retry(NoBackoff(), retries),
    }
    connection_class = options.get("connection_class")
    if not (isinstance(connection_class, type) and issubclass(connection_class, UnixSocket)):
        # TCP only: a unix:// connection takes no such option (TypeError at each connect)
        defaults["socket_keepalive"] = True
    # options of several types, from the URL as redis-py's from_url passes them
    pool = BlockingConnectionPool(**{**defaults, **options})  # type: ignore[arg-type]
    return Redis.from_pool(pool)  # the client owns (and closes) its pool


def safe_url(url: str) -> str:
    """The Redis URL without its credentials, for logs: ``user:password@`` and a query
    string (redis-py reads ``?password=``) are masked."""
    scheme, _, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    base, sep, _query = rest.partition("?")
    return f"{scheme}://{base}{sep and '?***'}"

"""``nlpserve worker``: the inference side of the Redis Streams backend (docs/scale-out.md).

One worker process serves every model of the repository (or those NLPSERVE_LOAD_MODELS
selects), each at one version:

* reads all of its models' work streams through the consumer group ``workers``
  (``XREADGROUP ... COUNT n BLOCK ms``), never holding more than ``worker_prefetch``
  interactive entries of one model, nor more than that many of the model in all before it
  takes a batch or explain entry (streams at their limit are left out of the read; the
  others are still read, so a batch flood never keeps an interactive entry in Redis);
* forms batches with the same :class:`BucketScheduler` rules as the in-process queue and
  runs them on executor threads (the event loop keeps reading, replying and reclaiming);
* PUBLISHes each reply to the channel of the replica waiting for it, and only then
  ``XACK``s and ``XDEL``s the entry (same pipeline, in that order), so a crash between the
  two leaves the entry pending: it is redone and the duplicate reply is dropped by the API;
* keeps the entries it holds alive (``XCLAIM ... JUSTID``) and reclaims entries left
  pending by dead workers (``XPENDING … IDLE``, then ``XCLAIM``) after
  ``redis_claim_idle_ms``;
* an entry delivered more than ``redis_max_attempts`` times, or failing that many times,
  goes to the model's dead-letter stream and its client gets an error reply, not a hang;
* SIGTERM: stop reading, finish the work in hand, ack, exit.

Metrics (and ``/healthz``, ``/readyz``) are served on ``metrics_port``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from operator import itemgetter
from typing import Any, Protocol, TypedDict, cast

from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, OutOfMemoryError, RedisError, ResponseError

from service.batching import BucketScheduler, WorkItem
from service.batching.scheduler import DEFAULT_LANES, PREDICT_LANE, lane_for_next_batch
from service.clock import RedisClock
from service.config import Settings
from service.loop_lag import LoopLagMonitor
from service.metrics import Metrics, WorkerMetrics
from service.queueing import codec
from service.queueing.base import updated_pace
from service.queueing.inprocess import BatchRunner, timed_live_items
from service.queueing.redis_keys import (
    ANNOUNCED_LANES,
    GROUP,
    WORKER_ALIVE_S,
    cancel_channel,
    dead_letter_stream,
    decode_cancel,
    decode_pace,
    encode_pace,
    lane_readers_key,
    layout,
    make_client,
    model_pace_key,
    model_streams,
    model_workers_key,
    safe_url,
    stream_labels,
    workers_key,
)
from service.repository import Manifest

log = logging.getLogger(__name__)

# Replies as make_client's connections read them: RESP2 shapes, bytes (the settings refuse the
# URL options that change either). redis-py's own reply types span every shape.
StreamEntry = tuple[bytes, dict[bytes, bytes] | None]  # fields None: deleted while pending
ReadReply = list[tuple[bytes, list[StreamEntry]]]  # XREADGROUP: per stream, its entries
ClaimReply = list[tuple[bytes | None, dict[bytes, bytes] | None]]  # XCLAIM (Redis < 7: nil)


class PendingRow(TypedDict):
    """One row of XPENDING's extended form, as redis-py names its fields."""

    message_id: bytes
    consumer: bytes
    time_since_delivered: int
    times_delivered: int


DEAD_LETTER_MAXLEN = 10_000
# Why an entry goes to the dead-letter stream (label `reason`): its run failed, it was
# delivered NLPSERVE_REDIS_MAX_ATTEMPTS times (workers died on it), or it could not be read.
DEAD_LETTER_REASONS = ("failed", "redelivered", "malformed")
SETTLE_RETRY_S = 5.0  # how long a worker keeps trying to deliver finished work to Redis
CLOSE_WAIT_S = 5.0  # how long a stopping worker waits for its loops once cancelled
# XREADGROUP's BLOCK while some streams are left out of the read (their model, or its batch
# and explain lanes, hold all the entries they may)
FULL_MODEL_BLOCK_MS = 50
# Dead-letter an entry at most once. After a stall, the stalled worker and the one that
# reclaimed the entry can both decide it is poison; only one still finds it pending (the
# other acked it). A refused XADD (OOM, wrong key type) still acks and deletes the entry,
# as a plain pipeline did, and the refusal comes back as the script's error.
# KEYS: work stream, dead-letter stream; ARGV: group, entry id, maxlen, field/value pairs.
DEAD_LETTER_LUA = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1) == 0 then return 0 end
local added = redis.pcall('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(ARGV, 4))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if type(added) == 'table' and added.err then return redis.error_reply(added.err) end
return 1
"""


class Runner(BatchRunner, Protocol):
    """What a worker needs of a model (``service.runtime.runner.ModelRunner``)."""

    manifest: Manifest
    buckets: list[int]
    provider: str
    token_cost_s: float | None  # seconds per padded token, measured at warm-up


@dataclass(eq=False)
class StreamItem(WorkItem):
    """A work item plus where it came from in Redis."""

    stream: str = ""
    entry_id: bytes = b""
    reply_to: str = ""
    delivered: int = 1  # deliveries so far, this one included (the PEL delivery count)
    touched: float = 0.0  # monotonic time it was last read/claimed/kept alive
    cancelled: bool = False  # its request gave up while its batch waited to run

    def gone(self) -> bool:
        """Not worth running: its request gave up, or its deadline passed."""
        return self.cancelled or self.expired()


@dataclass
class _Done:
    """An entry leaving the worker: optionally reply, optionally dead-letter, then ack+del."""

    stream: str
    entry_id: bytes
    reply_to: str = ""
    reply: codec.Reply | None = None
    dead: dict[bytes, bytes] | None = None
    model: str = ""


@dataclass
class WorkerStats:
    """Plain counters mirrored from the metrics (tests read these)."""

    batches: int = 0
    replies: int = 0
    reclaimed: int = 0
    dead_lettered: int = 0
    expired: int = 0
    cancelled: int = 0
    retried: int = 0
    # the last batches' sizes (bounded: a worker runs for months)
    batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=1000))


class Worker:
    def __init__(
        self,
        settings: Settings,
        runners: Mapping[str, Runner],
        metrics: Metrics | None = None,
        lanes: tuple[str, ...] = DEFAULT_LANES,
    ) -> None:
        """``lanes``: the lanes whose streams it reads (fewer only to act as a worker of an
        earlier version, in tests of mixed versions)."""
        if not runners:
            raise ValueError("a worker needs at least one model")
        self.settings = settings
        self.runners = dict(runners)
        self.metrics = metrics if metrics is not None else Metrics()
        self.name = (
            settings.worker_name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        )
        self.prefix = settings.redis_prefix
        # Times other processes read or wrote (deadlines, heartbeats, paces) are on Redis'
        # clock: this worker measures its offset to it (service/clock.py).
        self.clock = RedisClock(f"worker {self.name}")
        self._workers_key = workers_key(self.prefix)
        # Each model as loaded (version, bucket edges) keys its streams and its heartbeat set:
        # replicas tell from the set whether anyone serves the layout they enqueue for.
        layouts = {m: layout(r.manifest.version, r.buckets) for m, r in self.runners.items()}
        # ...and, per lane an earlier version does not read, that this worker reads it: those
        # first, so that a replica's probe between the two never counts it as not reading
        self._served_keys = [
            lane_readers_key(self.prefix, m, x, lane)
            for m, x in layouts.items()
            for lane in ANNOUNCED_LANES
            if lane in lanes
        ]
        self._served_keys += [model_workers_key(self.prefix, m, x) for m, x in layouts.items()]
        # Each model's seconds per sequence on one thread, averaged over its recent batches:
        # published with the heartbeat, for the replicas' admission (docs/service.md).
        self._pace_keys = {m: model_pace_key(self.prefix, m, x) for m, x in layouts.items()}
        self._seq_cost: dict[str, float] = {}
        self.schedulers: dict[str, BucketScheduler[StreamItem]] = {
            m: BucketScheduler(settings.batch_policy(r.provider, r.token_cost_s))
            for m, r in self.runners.items()
        }
        self._stream_model: dict[str, str] = {}
        for m, r in self.runners.items():
            for s in model_streams(self.prefix, m, layouts[m], len(r.buckets), lanes):
                self._stream_model[s] = m
        self.streams = list(self._stream_model)
        # the predict lane's streams, which have a room of their own (_rooms)
        self._interactive = {s for s in self.streams if stream_labels(s)[3] == PREDICT_LANE}
        # Per model, as in-process: its own executor threads, and the batches it may hand them
        # (the running ones and those queued behind them). With one executor and one count
        # for all models, a flooded model's batches took every slot and a cheap model's batch
        # queued behind the one formed ahead of it.
        self._threads = {m: settings.inference_threads_for(r.provider) for m, r in runners.items()}
        self._slots = {m: t + settings.prefetch_batches for m, t in self._threads.items()}
        self._executors: dict[str, ThreadPoolExecutor] = {}
        self._in_hand: dict[tuple[str, bytes], StreamItem] = {}
        self._version_checked = False
        self._running = 0  # batches formed and not yet settled (replied to, acked)
        # per model, batches on its executor (running or queued behind): what slots and
        # idleness count; a batch leaves it when its thread is done, not after its replies
        self._on_threads = dict.fromkeys(self.runners, 0)
        self._stopping = False
        self._closing = False  # run() is tearing down: the background loops end
        # The read loop has ended: no XREADGROUP is in flight, so nothing more can arrive. The
        # batcher may leave only then (a read returning after it left stranded its entries
        # for the claim idle time).
        self._reader_done = False
        self._reclaiming = False  # the same for a reclaim sweep (the maintenance loop)
        self._batch_tasks: set[asyncio.Task[None]] = set()
        self.connected = False
        self._down_logged = False  # "Redis unreachable" logged for the current outage
        self._beat_refused = False  # the last heartbeat was refused (logged once)
        self.stats = WorkerStats()
        self._heartbeat = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._http: ThreadingHTTPServer | None = None
        self.metrics_port: int | None = None
        self.wm = WorkerMetrics(
            self.metrics.registry,
            in_hand=lambda: len(self._in_hand),
            connected=lambda: self.connected,
        )
        self.metrics.clock_offset(self.clock.skew)
        # Every model's rare-event series exist from the start, at 0: a series born at its
        # first event shows no increase() to Prometheus, and that first event is the alert.
        for m in self.runners:
            self.wm.reclaimed.labels(m)
            for reason in DEAD_LETTER_REASONS:
                self.wm.dead_lettered.labels(m, reason)

    # ------------------------------------------------------------------ lifecycle
    async def serve(self) -> None:
        """Run until SIGTERM/SIGINT (the ``nlpserve worker`` entry point)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        self.start_http(self.settings.metrics_port)
        try:
            await self.run()
        finally:
            self.stop_http()

    async def run(self) -> None:
        """Work until :meth:`stop`; then drain what is in hand (bounded) and return."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._stop_event = asyncio.Event()
        if self._stopping:
            self._stop_event.set()
        self._executors = {
            m: ThreadPoolExecutor(t, thread_name_prefix=f"nlpserve-worker-{m}")
            for m, t in self._threads.items()
        }
        # A blocked XREADGROUP holds its socket for block_ms: the read timeout must outlast it.
        self.client: Redis = make_client(
            self.settings, blocks_s=self.settings.redis_block_ms / 1000
        )
        log.info(
            "worker %s: models %s, %d streams, group %r",
            self.name,
            ", ".join(self.runners),
            len(self.streams),
            GROUP,
        )
        reader = asyncio.create_task(self._read_loop(), name="worker-read")
        batcher = asyncio.create_task(self._batch_loop(), name="worker-batch")
        maint = asyncio.create_task(self._maintenance_loop(), name="worker-maintenance")
        cancels = asyncio.create_task(self._cancel_loop(), name="worker-cancels")
        stop = asyncio.create_task(self._stop_event.wait())
        tasks = {reader, batcher, maint, cancels}
        lag = LoopLagMonitor(self.metrics.loop_lag, self.metrics.loop_lag_max)
        lag.start()
        try:
            done, _ = await asyncio.wait({stop, *tasks}, return_when=asyncio.FIRST_COMPLETED)
            for t in done & tasks:
                t.result()  # a loop that raised: a bug, not a shutdown
                if not self._stopping:
                    raise RuntimeError(f"{t.get_name()} ended unexpectedly")
            log.info("worker %s: stopping; finishing %d entries", self.name, len(self._in_hand))
            # stop reading (the current XREADGROUP returns within block_ms), run what is in
            # hand, and what that read brings, without waiting for batches to fill, ack, then
            # leave. A read stuck past that (Redis unreachable) is given up: whatever it
            # delivered stays pending for another worker.
            await asyncio.wait({reader}, timeout=self.settings.redis_block_ms / 1000 + 1.0)
            if not reader.done():
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader
            _, late = await asyncio.wait({batcher}, timeout=self.settings.worker_drain_timeout_s)
            if late:
                log.warning(
                    "worker %s: drain timed out; %d entries stay pending for other workers",
                    self.name,
                    len(self._in_hand),
                )
        finally:
            await lag.stop()  # first: the awaits below may be cancelled
            # A cancel can be lost inside redis-py (a task cancelled as the worker starts
            # carried on): the loops also end on this flag, and the wait is bounded.
            self._closing = True
            ending = {stop, *tasks, *self._batch_tasks}
            for t in ending:
                t.cancel()
            ended, stuck = await asyncio.wait(ending, timeout=CLOSE_WAIT_S)
            for t in ended:  # retrieved: a loop that raised was reported above
                if not t.cancelled():
                    t.exception()
            if stuck:
                log.warning(
                    "worker %s: %s did not end within %.0f s of the stop",
                    self.name,
                    ", ".join(sorted(t.get_name() for t in stuck)),
                    CLOSE_WAIT_S,
                )
            for executor in self._executors.values():
                executor.shutdown(wait=False, cancel_futures=True)
            with contextlib.suppress(Exception):
                async with self.client.pipeline(transaction=False) as pipe:
                    for key in (self._workers_key, *self._served_keys):
                        pipe.zrem(key, self.name)
                    for key in self._pace_keys.values():
                        pipe.hdel(key, self.name)
                    await pipe.execute()
            with contextlib.suppress(Exception):
                await self.client.aclose()
            log.info("worker %s: stopped", self.name)

    def stop(self) -> None:
        """Begin a graceful stop (call on the worker's loop, e.g. from a signal handler)."""
        self._stopping = True
        if self._loop is not None:
            self._stop_event.set()
            self._wake.set()
            self._room.set()

    @property
    def batches_in_flight(self) -> int:
        """Batches handed to the executor and not yet settled (running or queued)."""
        return self._running

    def alive(self) -> bool:
        return time.monotonic() - self._heartbeat < 30.0

    # ------------------------------------------------------------------ reading
    async def _ensure_groups(self) -> None:
        # Before the first read: a backlog read with this host's clock for Redis' would be
        # judged by it (all expired, on a host whose clock runs ahead).
        await self.clock.sync(self.client)
        # id 0, not $: entries queued before any worker existed must be served too
        # ("any order" start-up); MKSTREAM creates streams no replica has written yet.
        async with self.client.pipeline(transaction=False) as pipe:
            for s in self.streams:
                pipe.xgroup_create(s, GROUP, id="0", mkstream=True)
            results = await pipe.execute(raise_on_error=False)
        for stream, res in zip(self.streams, results, strict=True):
            if not isinstance(res, Exception) or "BUSYGROUP" in str(res):
                continue
            # At maxmemory Redis refuses XGROUP CREATE before it looks for the group, while
            # reads, claims, acks and replies still run: a worker started then (scaled out
            # because the queue filled the memory) must still drain the groups that exist.
            if not isinstance(res, OutOfMemoryError) or not await self._group_exists(stream):
                raise res
        if not self._version_checked:
            self._version_checked = True
            version = await self._redis_version()
            if version is None:
                log.info(
                    "worker %s: the Redis user may run neither HELLO nor INFO: not checking "
                    "that Redis is 7.0 or newer",
                    self.name,
                )
                return
            if not redis_version_supported(version):
                # 6.x's XCLAIM returns deleted entries as nil and keeps them pending: a dead
                # worker's entries whose clients left would be listed again forever
                log.warning(
                    "worker %s: Redis %s is older than 7.0, which nlpserve needs for the "
                    "clean-up of entries deleted while pending; upgrade Redis",
                    self.name,
                    version,
                )

    async def _group_exists(self, stream: str) -> bool:
        try:
            await self.client.xinfo_consumers(stream, GROUP)
        except ResponseError as e:
            if "NOGROUP" in str(e):
                return False
            raise
        return True

    async def _redis_version(self) -> str | None:
        """The server's version from HELLO, which any user may run (INFO is in ACL's
        @dangerous category, which a least-privilege user lacks); INFO on Redis 6.0, whose
        HELLO needs a protocol version. None: neither is allowed."""
        try:
            hello = await self.client.execute_command("HELLO")
        except ResponseError:
            try:
                return str((await self.client.info("server")).get("redis_version", "0"))
            except NoPermissionError:
                return None
        if isinstance(hello, list):  # RESP2: a flat list of fields and values
            hello = dict(zip(hello[::2], hello[1::2], strict=False))
        version = hello.get(b"version", hello.get("version", b"0"))
        return version.decode() if isinstance(version, bytes) else str(version)

    async def _read_loop(self) -> None:
        try:
            await self._read_until_stopped()
        finally:
            self._reader_done = True
            self._wake.set()

    async def _read_until_stopped(self) -> None:
        delay = 0.05
        groups_ok = False
        while not self._stopping:
            try:
                if not groups_ok:
                    await self._ensure_groups()
                    groups_ok = True
                # Per stream, as many as it may still bring in (_rooms): a model holding all
                # it may (a flood) is left out of the read, the others are still read, and
                # so are its interactive streams while batch entries fill the rest.
                rooms = self._rooms()
                streams = [s for s in self.streams if rooms[s] > 0]
                if not streams:
                    self._room.clear()
                    await self._room.wait()
                    continue
                block_ms = self.settings.redis_block_ms
                left_out = len(streams) < len(self.streams)
                if left_out:
                    # a blocked read cannot take in a stream left out: look again soon
                    block_ms = min(block_ms, FULL_MODEL_BLOCK_MS)
                # /readyz waits for a read that worked: at start (or after an outage) that
                # one returns at once instead of blocking redis_block_ms for work
                block = block_ms if self.connected else None
                read = asyncio.ensure_future(self._read(streams, rooms, block))
                try:
                    if left_out:
                        await self._read_beside(read, set(streams))
                    resp = await read
                finally:
                    read.cancel()  # done by now, unless this task is being cancelled
                self._set_connected(True)
                delay = 0.05
            except ResponseError as e:
                if "NOGROUP" in str(e):  # Redis restarted empty or was flushed: recreate
                    log.warning("worker %s: consumer group missing (%s); recreating", self.name, e)
                    groups_ok = False
                    continue
                # e.g. OOM (XREADGROUP writes the PEL): Redis is up but refuses; wait
                log.warning("worker %s: Redis refused a read (%s); retrying", self.name, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            except (RedisError, OSError) as e:
                if self.connected or not self._down_logged:  # once per outage, at start too
                    log.warning(
                        "worker %s: Redis at %s unreachable (%s); retrying",
                        self.name,
                        safe_url(self.settings.redis_url),
                        e,
                    )
                    self._down_logged = True
                self._set_connected(False)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            for stream, entries in cast(ReadReply, resp or []):
                await self._accept(stream.decode(), entries)

    async def _read(self, streams: list[str], rooms: Mapping[str, int], block: int | None) -> Any:
        """One ``XREADGROUP`` of ``streams`` (each with room: ``rooms``, from :meth:`_rooms`).
        COUNT applies to each stream: the smallest room read, so that a stream close to its
        limit is not given the room of another (up to redis_read_count of it); a stream at
        its limit is left out, so this stays above 0."""
        return await self.client.xreadgroup(
            GROUP,
            self.name,
            dict.fromkeys(streams, ">"),
            count=min(self.settings.redis_read_count, min(rooms[s] for s in streams)),
            block=block,
        )

    async def _read_beside(self, read: asyncio.Future[Any], reading: set[str]) -> None:
        """While ``read`` (of the streams ``reading``) blocks, read the streams left out of it
        for lack of room as soon as a settle frees some, without blocking: in a flood of
        batch-priority work, whose streams are left out while its entries fill the room and
        the interactive streams are read, each answered batch is still replaced at once,
        as when a full model waited for room, not FULL_MODEL_BLOCK_MS later."""
        while not self._stopping:
            self._room.clear()
            rooms = self._rooms()
            if ready := [s for s in self.streams if s not in reading and rooms[s] > 0]:
                try:
                    resp = await self._read(ready, rooms, None)
                except (RedisError, OSError) as e:  # the blocked read meets it too: reported
                    log.debug("worker %s: a read beside the blocked one: %s", self.name, e)
                else:
                    for stream, entries in cast(ReadReply, resp or []):
                        await self._accept(stream.decode(), entries)
            if read.done():
                return
            room = asyncio.ensure_future(self._room.wait())
            try:
                await asyncio.wait({read, room}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                room.cancel()
            if read.done():
                return

    def _rooms(self) -> dict[str, int]:
        """Per stream, the entries it may still bring in. A model's interactive (predict
        lane) streams: ``worker_prefetch`` less the interactive entries held, whatever else
        is held, so batch-priority entries filling the prefetch never keep an interactive
        one in Redis; its batch and explain streams: ``worker_prefetch`` less every entry of
        the model held (what interactive work leaves, as its lanes run only then). A worker
        may so hold up to twice ``worker_prefetch`` entries of a model, at most
        ``worker_prefetch`` of them batch or explain ones."""
        # Run before every read, and after each settle beside a blocked one: the entries are
        # counted by their keys' streams in C, then per model over the streams. A Python
        # visit of each entry held cost ~0.1 ms a call at 4 models x 64 held (~20 µs now).
        held = dict.fromkeys(self.runners, 0)
        interactive = dict.fromkeys(self.runners, 0)
        for stream, n in Counter(map(itemgetter(0), self._in_hand)).items():
            m = self._stream_model[stream]
            held[m] += n
            if stream in self._interactive:
                interactive[m] += n
        prefetch = self.settings.worker_prefetch
        return {
            s: prefetch - (interactive if s in self._interactive else held)[m]
            for s, m in self._stream_model.items()
        }

    def _set_connected(self, ok: bool) -> None:
        if ok and not self.connected:
            log.info("worker %s: connected to Redis", self.name)
            self._down_logged = False
        self.connected = ok

    async def _accept(
        self,
        stream: str,
        entries: Iterable[StreamEntry],
        delivered: Mapping[bytes, int] | None = None,
    ) -> None:
        """Turn stream entries into scheduled work (or settle them right away)."""
        model = self._stream_model[stream]
        now = time.monotonic()
        settle: list[_Done] = []
        max_attempts = self.settings.redis_max_attempts
        for entry_id, fields in entries:
            if not fields:  # deleted while pending (client gone, trimmed): nobody waits
                settle.append(_Done(stream, entry_id, model=model))
                continue
            if (stream, entry_id) in self._in_hand:
                continue
            n = delivered.get(entry_id, 1) if delivered else 1
            try:
                dw = codec.decode_work(fields, offset=self.clock.offset)
                if dw.item.model != model:
                    raise codec.CodecError(f"entry for model {dw.item.model!r} in {stream}")
            except codec.CodecError as e:
                log.error("worker %s: malformed entry %s in %s: %s", self.name, entry_id, stream, e)
                settle.append(self._dead(stream, entry_id, dict(fields), str(e), "malformed"))
                continue
            w = dw.item
            item = StreamItem(
                model=w.model,
                bucket=w.bucket,
                length=w.length,
                features=w.features,
                deadline=w.deadline,
                lane=w.lane,
                id=w.id,
                # another machine's clock may run ahead: never let that delay a batch
                enqueued_at=min(w.enqueued_at, now),
                trace=w.trace,
                stream=stream,
                entry_id=entry_id,
                reply_to=dw.reply_to,
                delivered=n,
                touched=time.monotonic(),
            )
            if n > max_attempts:
                # every earlier delivery ended without an answer: its workers died on it
                msg = f"delivered {n} times without an answer (it crashes workers?)"
                settle.append(self._dead_item(item, msg, "redelivered"))
                continue
            if item.expired(now):
                self._count_expired(model)
                settle.append(_Done(stream, entry_id, model=model))
                continue
            try:
                self.schedulers[model].add(item)
            except ValueError as e:  # unknown lane
                settle.append(self._dead_item(item, str(e), "malformed"))
                continue
            self._in_hand[(stream, entry_id)] = item
        if settle:
            await self._settle(settle)
        self._wake.set()

    # ------------------------------------------------------------------ batching
    def _ahead_lane(self, model: str) -> str | None:
        return lane_for_next_batch(self._on_threads[model], self._threads[model])

    def _has_slot(self, model: str) -> bool:
        return self._on_threads[model] < self._slots[model]

    def _pick(
        self, now: float, models: list[str], start: int
    ) -> tuple[str, list[StreamItem]] | None:
        for k in range(len(models)):
            m = models[(start + k) % len(models)]
            if not self._has_slot(m):
                continue
            # As in-process: an idle thread takes pending work at once (InProcessQueue._loop).
            idle = self._on_threads[m] < self._threads[m] and not self.settings.wait_when_idle
            no_wait = self._stopping or idle
            batch = self.schedulers[m].next_batch(now, no_wait=no_wait, lane=self._ahead_lane(m))
            if batch:
                return m, batch
        return None

    async def _batch_loop(self) -> None:
        models = list(self.schedulers)
        rr = 0  # round-robin start, so one busy model cannot starve another
        while True:
            now = time.monotonic()
            expired: list[StreamItem] = []
            for s in self.schedulers.values():
                expired += s.drop_expired(now)
            if expired:
                for it in expired:
                    self._count_expired(it.model)
                    self._in_hand.pop((it.stream, it.entry_id), None)
                # the API already answered 504 at the deadline: just ack
                await self._settle([_Done(i.stream, i.entry_id, model=i.model) for i in expired])
                now = time.monotonic()
            while (pick := self._pick(now, models, rr)) is not None:
                rr = (models.index(pick[0]) + 1) % len(models)
                self._running += 1
                self._on_threads[pick[0]] += 1
                task = asyncio.create_task(self._run_batch(*pick))
                self._batch_tasks.add(task)
                task.add_done_callback(self._batch_tasks.discard)
            pending = sum(len(s) for s in self.schedulers.values())
            if (
                self._stopping
                and self._reader_done
                and not self._reclaiming
                and self._running == 0
                and pending == 0
            ):
                return
            # sleep until new entries, a free thread, the next max-wait or the next deadline
            waits: list[float] = []
            for m, s in self.schedulers.items():
                if self._has_slot(m) and (
                    (w := s.next_wakeup(now, lane=self._ahead_lane(m))) is not None
                ):
                    waits.append(w)
                if (d := s.oldest_deadline()) is not None:
                    waits.append(max(0.0, d - now))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(waits) if waits else None):
                    await self._wake.wait()

    async def _run_batch(self, model: str, batch: list[StreamItem]) -> None:
        handed_back: set[int] = set()  # retried: queued again, answered by a later batch
        try:
            runner = self.runners[model]
            t0 = time.perf_counter()
            try:
                # a batch formed ahead waited behind the running one: skip what is gone
                results, seconds = await asyncio.get_running_loop().run_in_executor(
                    self._executors[model], timed_live_items, runner, batch, StreamItem.gone
                )
            except Exception as e:  # executor gone or a bug: treat as a failure of each
                log.exception("worker %s: batch of %s failed", self.name, model)
                results, seconds = [e] * len(batch), 0.0
            finally:
                # the thread is free: the next batch may form while these replies are written
                self._on_threads[model] -= 1
                self._wake.set()
            ran = [it for it, res in zip(batch, results, strict=True) if res is not None]
            if ran and getattr(runner, "metrics", None) is not self.metrics:
                # runners loaded with this worker's Metrics record batches themselves
                self.metrics.observe_batch(
                    model,
                    ran[0].bucket,
                    len(ran),
                    sum(it.length for it in ran),
                    len(ran) * max(it.length for it in ran),
                    time.perf_counter() - t0,
                )
            if ran:
                self.stats.batches += 1
                self.stats.batch_sizes.append(len(ran))
            if (pace := updated_pace(self._seq_cost.get(model), seconds, len(ran))) is not None:
                self._seq_cost[model] = pace
            done: list[_Done] = []
            retry: list[StreamItem] = []
            for it, res in zip(batch, results, strict=True):
                if res is None:  # gone before its batch ran: the API answered it, ack
                    if it.expired():
                        self._count_expired(model)
                    else:
                        self.wm.cancelled.labels(model).inc()
                        self.stats.cancelled += 1
                    done.append(_Done(it.stream, it.entry_id, model=model))
                elif not isinstance(res, Exception):
                    reply = codec.Reply(it.id, outputs=res, run_s=seconds)
                    done.append(_Done(it.stream, it.entry_id, it.reply_to, reply, model=model))
                elif it.delivered >= self.settings.redis_max_attempts:
                    done.append(self._dead_item(it, f"{type(res).__name__}: {res}", "failed"))
                else:
                    retry.append(it)
            await self._settle(done)
            for it in retry:
                await self._retry(it)
                handed_back.add(id(it))
        except Exception as e:  # a bug past inference: answer what is still held, never jam
            log.exception("worker %s: settling a batch of %s failed", self.name, model)
            held = [
                it
                for it in batch
                if (it.stream, it.entry_id) in self._in_hand and id(it) not in handed_back
            ]
            error = f"the worker failed to answer this batch ({type(e).__name__}: {e})"
            await self._settle([self._failed(it, error) for it in held])
        finally:
            self._running -= 1
            self._wake.set()

    def _failed(self, item: StreamItem, error: str) -> _Done:
        reply = codec.Reply(item.id, status=codec.STATUS_FAILED, error=error)
        return _Done(item.stream, item.entry_id, item.reply_to, reply, model=item.model)

    async def _retry(self, item: StreamItem) -> None:
        """Redeliver a failed entry to ourselves at once. XCLAIM bumps its delivery count in
        Redis, so attempts are counted the same way whether a worker failed or died."""
        key = (item.stream, item.entry_id)
        try:
            claimed = await self.client.xclaim(
                item.stream, GROUP, self.name, 0, [item.entry_id], justid=False
            )
        except (RedisError, OSError) as e:
            # cannot count the attempt: leave it pending; it is reclaimed after the idle time
            log.warning("worker %s: cannot retry %s (%s)", self.name, item.entry_id, e)
            self._in_hand.pop(key, None)
            self._room.set()
            return
        if not claimed or not claimed[0][1]:  # deleted meanwhile: its client is gone
            self._in_hand.pop(key, None)
            await self._settle([_Done(item.stream, item.entry_id, model=item.model)])
            return
        item.delivered += 1
        item.touched = time.monotonic()
        self.stats.retried += 1
        self.schedulers[item.model].add(item)
        self._wake.set()

    # ------------------------------------------------------------------ settling
    def _dead_item(self, item: StreamItem, error: str, reason: str) -> _Done:
        # the work item id is what the API logs next to the client's request id
        log.error(
            "worker %s: entry %s in %s (work item %s) goes to the dead-letter stream (%s): %s",
            self.name,
            item.entry_id.decode(errors="replace"),
            item.stream,
            item.id,
            reason,
            error,
            extra={"worker": self.name, "model": item.model, **item.log_fields()},
        )
        fields = codec.encode_work(
            item, item.reply_to, attempt=item.delivered, offset=self.clock.offset
        )
        done = self._dead(item.stream, item.entry_id, fields, error, reason)
        done.reply_to = item.reply_to
        done.reply = codec.Reply(
            item.id,
            status=codec.STATUS_FAILED,
            error=f"the model could not process this input ({error}); "
            f"moved to the dead-letter stream after {item.delivered} attempt(s)",
        )
        return done

    def _dead(
        self, stream: str, entry_id: bytes, fields: dict[bytes, bytes], error: str, reason: str
    ) -> _Done:
        model = self._stream_model[stream]
        dead = dict(fields)
        dead.update(
            {
                b"dead_reason": reason.encode(),
                b"dead_error": error.encode(errors="replace")[:2000],
                b"dead_source": stream.encode(),
                b"dead_entry": entry_id,
                b"dead_worker": self.name.encode(),
                b"dead_at": repr(self.clock.now()).encode(),
            }
        )
        # a malformed entry still gets an error reply when its reply channel is readable
        reply_to, rid = fields.get(codec.F_REPLY_TO, b""), fields.get(codec.F_ID, b"")
        reply = None
        if reply_to and rid:
            reply = codec.Reply(rid.decode(errors="replace"), codec.STATUS_FAILED, error=error)
        return _Done(
            stream, entry_id, reply_to.decode(errors="replace"), reply, dead=dead, model=model
        )

    def _count_dead_letters(
        self, dead: Sequence[_Done], results: Sequence[object], *, retried: bool
    ) -> None:
        """``retried``: the pipeline was sent again after a lost connection, so a script
        that found its entry settled may have been our own first attempt: counted."""
        for d, res in zip(dead, results, strict=True):
            if res == 1 or (res == 0 and retried):
                reason = (d.dead or {}).get(b"dead_reason", b"").decode()
                self.wm.dead_lettered.labels(d.model, reason).inc()
                self.stats.dead_lettered += 1
            elif res == 0:
                log.info(
                    "worker %s: %s %s was settled by another worker; not dead-lettered again",
                    self.name,
                    d.stream,
                    d.entry_id.decode(errors="replace"),
                )

    async def _cancel_loop(self) -> None:
        """Drop entries we hold and have not run whose request gave up (the API publishes
        them on ``P:cancel`` as it deletes them): a client gone does not leave its work to
        run, as in-process. Best effort: a notice missed while reconnecting costs only a
        batch whose answer nobody reads."""
        delay = 0.05
        while not self._closing:
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(cancel_channel(self.prefix))
                delay = 0.05
                while not self._closing:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is not None and msg["type"] == "message":
                        await self._drop_cancelled(decode_cancel(msg["data"]))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # Redis away: resubscribe below
                log.debug("worker %s: cancel channel: %s", self.name, e)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _drop_cancelled(self, entries: set[tuple[str, bytes]]) -> None:
        if not entries.intersection(self._in_hand):
            return  # another worker's, or already run
        dropped: list[StreamItem] = []
        for sched in self.schedulers.values():
            dropped += sched.drop(lambda it: (it.stream, it.entry_id) in entries)
        for key in entries.intersection(self._in_hand):
            # in a batch already formed: skipped if it has not started yet (run_live_items)
            self._in_hand[key].cancelled = True
        now = time.monotonic()
        for it in dropped:
            self._in_hand.pop((it.stream, it.entry_id), None)
            if it.expired(now):  # the replica gave up at the deadline: counted as such
                self._count_expired(it.model)
            else:
                self.wm.cancelled.labels(it.model).inc()
                self.stats.cancelled += 1
        # the API already deleted them: just ack
        await self._settle([_Done(it.stream, it.entry_id, model=it.model) for it in dropped])
        self._room.set()

    def _count_expired(self, model: str) -> None:
        self.wm.expired.labels(model).inc()
        self.stats.expired += 1

    async def _settle(self, done: Sequence[_Done]) -> None:
        """Reply, then dead-letter (the script acks those) and XACK + XDEL the rest: one
        pipeline, in that order."""
        if not done:
            return
        dead = [d for d in done if d.dead is not None]
        by_stream: dict[str, list[bytes]] = {}
        for d in done:
            if d.dead is None:  # the dead-letter script acks its own
                by_stream.setdefault(d.stream, []).append(d.entry_id)
        replies = [(d.reply_to, self._encoded(d)) for d in done if d.reply and d.reply_to]
        end = time.monotonic() + SETTLE_RETRY_S
        delay = 0.05
        sent = 0  # times the pipeline went out (a lost connection may hide that it ran)
        while True:
            try:
                sent += 1
                async with self.client.pipeline(transaction=False) as pipe:
                    for reply_to, payload in replies:
                        pipe.publish(reply_to, payload)
                    for d in dead:
                        pairs = [x for kv in (d.dead or {}).items() for x in kv]
                        pipe.eval(
                            DEAD_LETTER_LUA,
                            2,
                            d.stream,
                            dead_letter_stream(self.prefix, d.model),
                            GROUP,
                            d.entry_id,
                            DEAD_LETTER_MAXLEN,
                            *pairs,
                        )
                    for stream, ids in by_stream.items():
                        pipe.xack(stream, GROUP, *ids)
                        pipe.xdel(stream, *ids)
                    # A command Redis refuses (OOM or WRONGTYPE on the dead letter, READONLY
                    # after a failover) is not retried: the pipeline is no transaction, and
                    # sending it again would repeat the commands that did run (replies, dead
                    # letters). Unacked entries stay pending and are reclaimed later. A lost
                    # connection or LOADING (a ConnectionError) raises and is retried below.
                    results = await pipe.execute(raise_on_error=False)
                refused = [r for r in results if isinstance(r, Exception)]
                if refused:
                    log.warning(
                        "worker %s: Redis refused %d command(s) settling %d entries: %s",
                        self.name,
                        len(refused),
                        len(done),
                        refused[0],
                    )
                scripts = results[len(replies) : len(replies) + len(dead)]
                self._count_dead_letters(dead, scripts, retried=sent > 1)
                break
            except (RedisError, OSError) as e:
                if time.monotonic() > end:
                    # the entries stay pending in Redis (if Redis still has them) and are
                    # reclaimed and redone later; the API drops any duplicate reply
                    log.warning(
                        "worker %s: could not deliver %d results (%s); leaving them pending",
                        self.name,
                        len(done),
                        e,
                    )
                    break
                self._set_connected(False)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
        for d in done:
            self._in_hand.pop((d.stream, d.entry_id), None)
            if d.reply is not None:
                self.stats.replies += 1
                self.metrics.child(self.wm.replies, d.model, d.reply.status.decode()).inc()
        self._room.set()

    def _encoded(self, d: _Done) -> bytes:
        """``d``'s reply as bytes; an answer the codec cannot carry (an output dtype it does
        not know) becomes a failure reply, so the entry is still answered and acked."""
        assert d.reply is not None
        try:
            return codec.encode_reply(d.reply)
        except Exception as e:
            log.error("worker %s: cannot encode the %s answer: %s", self.name, d.model, e)
            d.reply = codec.Reply(
                d.reply.id,
                status=codec.STATUS_FAILED,
                error=f"the worker could not send the model's answer ({e})",
            )
            return codec.encode_reply(d.reply)

    # ------------------------------------------------------------------ maintenance
    async def _maintenance_loop(self) -> None:
        idle_ms = self.settings.redis_claim_idle_ms
        # at most every 50 ms: hence NLPSERVE_REDIS_CLAIM_IDLE_MS >= 200 (MIN_CLAIM_IDLE_MS)
        period = min(max(idle_ms / 4000, 0.05), 2.0)
        next_sample = 0.0
        next_gc = time.monotonic() + 60.0
        last_pass: float | None = None
        while not self._closing:
            # how late this pass runs: the keepalive below must come around well within
            # the claim idle time, or other workers take our entries over
            now = time.monotonic()
            if last_pass is not None:
                self.wm.maintenance_delay.observe(max(0.0, now - last_pass - period))
            last_pass = self._heartbeat = now
            try:
                await self._beat()
                await self._keepalive(idle_ms)
                if not self._stopping:
                    # like a read, a reclaim in flight when a stop comes brings entries the
                    # batcher must still run: it waits for this flag to drop
                    self._reclaiming = True
                    try:
                        await self._reclaim(idle_ms)
                    finally:
                        self._reclaiming = False
                        self._wake.set()
                now = time.monotonic()
                if now >= next_sample:
                    next_sample = now + 1.0
                    await self._sample_streams()
                if now >= next_gc and not self._stopping:
                    next_gc = now + 60.0
                    await self._forget_dead_consumers(max(600_000, 20 * idle_ms))
                    await self._forget_stale_paces()
            except (RedisError, OSError) as e:  # NOGROUP after a restart, Redis away...
                log.debug("worker %s: maintenance: %s", self.name, e)
            await asyncio.sleep(period)

    async def _keepalive(self, idle_ms: int) -> None:
        """Reset the idle time of entries we hold, so nobody reclaims live work."""
        limit = time.monotonic() - idle_ms / 3000
        stale: dict[str, list[StreamItem]] = {}
        for it in list(self._in_hand.values()):
            if it.touched < limit:
                stale.setdefault(it.stream, []).append(it)
        for stream, items in stale.items():
            await self._touch(stream, items)

    async def _touch(self, stream: str, items: list[StreamItem]) -> None:
        """Reset the idle time of entries we hold (``JUSTID``: no delivery is counted)."""
        await self.client.xclaim(
            stream, GROUP, self.name, 0, [it.entry_id for it in items], justid=True
        )
        now = time.monotonic()
        for it in items:
            it.touched = now

    async def _reclaim(self, idle_ms: int) -> None:
        """Take over entries that have sat unacknowledged for ``idle_ms`` (dead workers).

        ``XPENDING … IDLE`` lists them with their delivery counts; ``XCLAIM`` with the same
        min-idle time then takes each one only if it is still idle (its owner may have just
        refreshed it) and counts the delivery. Entries we hold ourselves show up here when
        our keepalive ran late: they are refreshed (``JUSTID``: not counted as a delivery),
        not taken over, so a slow worker does not push live work towards the poison limit.
        """
        for stream in self.streams:
            if self._stopping:
                return
            room = self._rooms()[stream]
            if room <= 0:
                continue
            rows = cast(
                list[PendingRow],
                await self.client.xpending_range(
                    stream, GROUP, min="-", max="+", count=min(room, 100), idle=idle_ms
                ),
            )
            ours: list[StreamItem] = []
            counts: dict[bytes, int] = {}  # delivery counts of the others, + this XCLAIM
            for row in rows:
                held = self._in_hand.get((stream, row["message_id"]))
                if held is not None:
                    ours.append(held)
                else:
                    counts[row["message_id"]] = int(row["times_delivered"]) + 1
            if ours:
                await self._touch(stream, ours)
            if not counts:
                continue
            # entries deleted while pending (client gone, trimmed) are not returned: Redis
            # >= 7.0 drops them from the pending list here
            reply = await self.client.xclaim(stream, GROUP, self.name, idle_ms, list(counts))
            claimed = [(i, f) for i, f in cast(ClaimReply, reply) if i is not None]
            if not claimed:
                continue
            model = self._stream_model[stream]
            log.warning(
                "worker %s: reclaimed %d idle entries of %s", self.name, len(claimed), stream
            )
            self.wm.reclaimed.labels(model).inc(len(claimed))
            self.stats.reclaimed += len(claimed)
            await self._accept(stream, claimed, counts)

    async def _sample_streams(self) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for s in self.streams:
                pipe.xlen(s)
                pipe.xpending(s, GROUP)
            res = await pipe.execute(raise_on_error=False)
        for k, s in enumerate(self.streams):
            length, pend = res[2 * k], res[2 * k + 1]
            if isinstance(length, Exception) or isinstance(pend, Exception):
                continue
            pending = int(pend["pending"])
            labels = stream_labels(s)
            # answered entries are deleted, so whatever is not pending is still unread
            self.wm.stream_lag.labels(*labels).set(max(0, int(length) - pending))
            self.wm.stream_pending.labels(*labels).set(pending)

    async def _beat(self) -> None:
        """Refresh this worker's heartbeat in ``P:workers`` and in each served layout's set
        (and drop the long silent ones): no other worker deletes the consumers of a worker
        that beats (below), and the API replicas count the workers alive
        (``nlpserve_workers_alive``, ``nlpserve_model_workers_alive``); samples the offset
        to Redis' clock (``TIME``) on the way."""
        if not self.clock.measured:
            # this host's clock, when it runs ahead, would drop the other workers' beats
            await self.clock.sync(self.client)
        now = self.clock.now()
        async with self.client.pipeline(transaction=False) as pipe:
            self.clock.sample(pipe)
            for key in (self._workers_key, *self._served_keys):
                pipe.zadd(key, {self.name: now})
                pipe.zremrangebyscore(key, "-inf", now - WORKER_ALIVE_S)
                # a version nobody serves any more leaves no set behind
                pipe.expire(key, int(2 * WORKER_ALIVE_S))
            for model, key in self._pace_keys.items():
                if (cost := self._seq_cost.get(model)) is not None:
                    pipe.hset(key, self.name, encode_pace(cost, self._threads[model], now))
                    pipe.expire(key, int(2 * WORKER_ALIVE_S))
            sent = time.monotonic()
            # A refused beat (ZADD and HSET at maxmemory) must not end the maintenance pass:
            # keeping entries alive and reclaiming a dead worker's still work then.
            res = await pipe.execute(raise_on_error=False)
        self.clock.take(sent, res[0], time.monotonic())
        refused = next(iter(self.clock.errors(res)), None)
        if refused is not None and not self._beat_refused:
            log.warning(
                "worker %s: Redis refused its heartbeat (%s): replicas stop counting it "
                "after %.0f s without one; it keeps serving",
                self.name,
                refused,
                WORKER_ALIVE_S,
            )
        elif refused is None and self._beat_refused:
            log.info("worker %s: heartbeat accepted again", self.name)
        self._beat_refused = refused is not None

    async def _forget_stale_paces(self) -> None:
        """Delete the paces of workers silent for WORKER_ALIVE_S (killed: a clean stop
        deletes its own), so a hash does not grow with every restart."""
        alive_since = self.clock.now() - WORKER_ALIVE_S
        for key in self._pace_keys.values():
            stale = [
                name
                for name, value in (await self.client.hgetall(key)).items()
                if (pace := decode_pace(value)) is None or pace[2] < alive_since
            ]
            if stale:
                await self.client.hdel(key, *stale)

    async def _forget_dead_consumers(self, older_than_ms: int) -> None:
        """Delete consumers (dead workers) that own nothing and have not been seen for a
        long time, so the group's consumer list does not grow with every restart.

        A consumer's idle time says little on a quiet stream (Redis < 7.2 does not reset it
        on a read that returns nothing), and a live worker whose consumer is deleted just
        as it reads an entry would lose that entry from the pending list: nobody could
        reclaim it. So a consumer whose worker still beats is never deleted."""
        for s in self.streams:
            idle = [
                name
                for c in await self.client.xinfo_consumers(s, GROUP)
                if (name := _s(c["name"])) != self.name
                and int(c["pending"]) == 0
                and int(c["idle"]) > older_than_ms
            ]
            if not idle:
                continue
            beats = await self.client.zmscore(self._workers_key, idle)
            alive_since = self.clock.now() - WORKER_ALIVE_S
            for name, beat in zip(idle, beats, strict=True):
                if beat is None or beat < alive_since:
                    await self.client.xgroup_delconsumer(s, GROUP, name)

    # ------------------------------------------------------------------ HTTP (metrics, health)
    def start_http(self, port: int) -> int:
        """Serve /metrics, /healthz, /readyz on ``port`` (0: any free port); returns it."""
        worker = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server naming)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    status, body = 200, worker.metrics.render()
                    ctype = worker.metrics.content_type
                elif path == "/healthz":
                    ok = worker.alive()
                    status, body, ctype = (200 if ok else 503), b"ok\n", "text/plain"
                elif path == "/readyz":
                    ok = worker.connected and not worker._stopping
                    body = b"ready\n" if ok else b"not ready\n"
                    status, ctype = (200 if ok else 503), "text/plain"
                else:
                    status, body, ctype = 404, b"not found\n", "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        try:
            self._http = ThreadingHTTPServer((self.settings.metrics_host, port), Handler)
        except OSError as e:
            raise SystemExit(_metrics_port_taken(self.settings.metrics_host, port, e)) from None
        self._http.daemon_threads = True
        self.metrics_port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, name="worker-http", daemon=True).start()
        log.info("worker %s: metrics on :%d/metrics", self.name, self.metrics_port)
        return self.metrics_port

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def redis_version_supported(version: str) -> bool:
    """Redis >= 7.0 (``HELLO``'s ``version``, e.g. ``7.0.15``)."""
    try:
        parts = [int(x) for x in version.split(".")[:2]]
    except ValueError:
        return False
    return tuple(parts) >= (7, 0)


def _metrics_port_taken(host: str, port: int, e: OSError) -> str:
    why = f"nlpserve worker: cannot serve /metrics on {host}:{port} ({e.strerror or e})"
    if e.errno == errno.EADDRINUSE:
        return (
            f"{why}: another worker on this host? Give each its own --metrics-port "
            "(NLPSERVE_METRICS_PORT; 0: any free port)"
        )
    return f"{why}: check NLPSERVE_METRICS_HOST and NLPSERVE_METRICS_PORT"


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def run_worker(settings: Settings) -> None:
    """Load the repository's models and consume work until SIGTERM."""
    from service.runtime.runner import load_runners

    # The port first: loading the models takes a while, and a second worker on the host
    # (same default port) should learn at once that it needs its own --metrics-port.
    if settings.metrics_port:
        try:
            with socket.create_server((settings.metrics_host, settings.metrics_port)):
                pass
        except OSError as e:
            raise SystemExit(
                _metrics_port_taken(settings.metrics_host, settings.metrics_port, e)
            ) from None
    metrics = Metrics()
    runners = load_runners(settings, metrics)
    if not runners:
        raise SystemExit(f"no models found in {settings.model_dir}")
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(Worker(settings, runners, metrics).serve())


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (a dependency on Linux), as the API's
    uvicorn picks it; else asyncio's: both roles of the one image run the same loop. (The
    worker's CPU per request fell by a third with hiredis, the C reply parser; uvloop made
    no measurable difference to it: bench/README.md, "The Redis worker's CPU".)"""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop

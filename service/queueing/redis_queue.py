"""API side of the Redis Streams backend: enqueue work, wait for replies on one channel.

A submit runs one Lua script that sums the model's stream lengths (the depth limit) and
XADDs the entries, atomically, so concurrent replicas cannot overshoot the limit; all the
submits of one event-loop moment share one pipelined round trip.
Workers (``service/worker.py``) read the streams through a consumer group, batch, infer and
PUBLISH each reply to the channel named in the entry. One listener task per replica
receives every reply and resolves the waiting future; a reply nobody waits for any more
(deadline passed, client gone, duplicate after a reclaim) is dropped, so each request is
answered exactly once from the client's view. See docs/scale-out.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from redis.exceptions import (
    AuthenticationError,
    NoScriptError,
    OutOfMemoryError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.batching.buckets import bucket_edges
from service.batching.scheduler import PREDICT_LANE, lanes_through, request_lane
from service.batching.types import WorkItem
from service.clock import RedisClock
from service.config import Settings
from service.metrics import Metrics
from service.queueing import codec
from service.queueing.autopipeline import AutoPipeline
from service.queueing.base import (
    BackendUnavailableError,
    DeadlineExceededError,
    InferenceFailedError,
    InferenceQueue,
    NoWorkersError,
    QueueFullError,
    depth_refusal,
    load_refusal,
    results_of,
)
from service.queueing.redis_client_counts import RedisClientCounts
from service.queueing.redis_keys import (
    ANNOUNCED_LANES,
    WORKER_ALIVE_S,
    cancel_channel,
    decode_pace,
    encode_cancel,
    lane_readers_key,
    layout,
    make_client,
    model_pace_key,
    model_streams,
    model_workers_key,
    reply_channel,
    safe_url,
    stream_labels,
    work_stream,
    workers_key,
)
from service.queueing.reply_loss import LOST, ReplyLoss
from service.repository.manifest import Manifest

log = logging.getLogger(__name__)

NO_WORKER_GRACE_S = 10.0  # no worker counted this long: log it (workers beat every <= 2 s)
HEALTH_INTERVAL_S = 0.5  # probe period: how fast /readyz notices Redis went away
# A refused/reset connection is conclusive at once; a slow answer may just be this busy
# process's event loop lagging, so only this many slow probes in a row count as "down".
HEALTH_TIMEOUTS_TO_FAIL = 3
LISTEN_POLL_S = 0.5  # the listener wakes this often to notice resubscribe requests
RETRY_AFTER_S = 1.0

# Admits a request's sequences of one model all together or not at all.
# KEYS: every work stream of the model. ARGV: depth limit, approximate MAXLEN, entry count,
# then per entry: 1-based KEYS index, number of field/value args, field/value pairs.
# Returns {depth after, {XLEN of each key after}, entry ids...}; no ids when the queue is full.
ADMIT_LUA = """
local lens, depth = {}, 0
for i = 1, #KEYS do
  lens[i] = redis.call('XLEN', KEYS[i])
  depth = depth + lens[i]
end
local n = tonumber(ARGV[3])
if depth + n > tonumber(ARGV[1]) then return {depth, lens} end
local out, p = {depth + n, lens}, 4
for e = 1, n do
  local k, nf = tonumber(ARGV[p]), tonumber(ARGV[p + 1])
  out[e + 2] = redis.call('XADD', KEYS[k], 'MAXLEN', '~', ARGV[2], '*',
                          unpack(ARGV, p + 2, p + 1 + nf))
  lens[k] = lens[k] + 1
  p = p + 2 + nf
end
return out
"""


@dataclass
class _Admission:
    keys: list[str]
    args: list[bytes | str | int]
    targets: list[str]
    fut: asyncio.Future[list[Any]]


_refusals_logged_at = -math.inf  # the last "Redis refused a write" line (one per 10 s)


def _redis_failure(e: RedisError) -> str:
    """What a client is told when Redis refuses: the cause, not Redis' script internals
    ("... script: c5c9ae68..., on @user_script:12."), which go to the log instead (at most
    one line per 10 s: under load every request meets the same refusal)."""
    global _refusals_logged_at
    text = str(e)
    if isinstance(e, RedisTimeoutError):
        # the script may still have run: then its entries run for nobody (the reply is dropped)
        return (
            "the queue backend (Redis) did not answer in time: the request may not have been "
            "queued, and no answer will come for it; retry later"
        )
    if (now := time.monotonic()) - _refusals_logged_at >= 10.0:
        _refusals_logged_at = now
        log.warning("Redis refused a write (more within 10 s are not logged): %s", text)
    if isinstance(e, OutOfMemoryError) or text.startswith("OOM"):
        return (
            "the queue backend (Redis) is out of memory (maxmemory, noeviction): not queued; "
            "retry later"
        )
    return f"the queue backend (Redis) refused the request ({type(e).__name__}); retry later"


@dataclass
class _Absence:
    """Since when a count of live workers has been 0 (None: it is not), and whether the
    absence has been logged."""

    since: float | None = None
    warned: bool = False

    def update(self, present: int | bool, now: float, grace_s: float) -> bool:
        """Record a count; True once, when an absence has just outlasted ``grace_s``."""
        if present:
            self.since, self.warned = None, False
            return False
        if self.since is None:
            self.since = now
        if not self.warned and now - self.since >= grace_s:
            self.warned = True
            return True
        return False

    def lasted(self, now: float) -> float:
        """Seconds the absence has lasted (-inf while workers are present)."""
        return float("-inf") if self.since is None else now - self.since


class RedisQueue(InferenceQueue):
    """``NLPSERVE_QUEUE=redis``: API replicas enqueue, ``nlpserve worker`` processes run."""

    def __init__(
        self,
        settings: Settings,
        manifests: Mapping[str, Manifest],
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.prefix = settings.redis_prefix
        self.replica = uuid.uuid4().hex[:12]
        self.channel = reply_channel(self.prefix, self.replica)
        # Times workers read (deadlines, heartbeats, paces) are on Redis' clock: the health
        # probe measures this process's offset to it (service/clock.py).
        self.clock = RedisClock(f"replica {self.replica}")
        if metrics is not None:
            metrics.clock_offset(self.clock.skew)
        # A replica and a worker meet only on the same model version and bucket edges (the
        # layout that keys streams and heartbeat sets): another version's vocabulary or
        # labels would answer wrongly, other edges put work where no worker reads.
        self._versions = {name: m.version for name, m in manifests.items()}
        # the effective edges (NLPSERVE_BUCKETS may override the manifest's), as workers
        self._edges = {name: bucket_edges(m, settings) for name, m in manifests.items()}
        self._layouts = {
            name: layout(m.version, self._edges[name]) for name, m in manifests.items()
        }
        self._streams = {
            name: model_streams(self.prefix, name, self._layouts[name], len(self._edges[name]))
            for name in manifests
        }
        self._served_keys = {
            name: model_workers_key(self.prefix, name, self._layouts[name]) for name in manifests
        }
        self._pace_keys = {
            name: model_pace_key(self.prefix, name, self._layouts[name]) for name in manifests
        }
        # (model, lane) -> the set of the live workers of its layout that read that lane's
        # streams (a worker of an earlier version does not), and their count at the last probe
        self._readers_keys = {
            (name, lane): lane_readers_key(self.prefix, name, self._layouts[name], lane)
            for name in manifests
            for lane in ANNOUNCED_LANES
        }
        self._lane_readers: dict[tuple[str, str], int] = {}
        self._waiting: dict[str, asyncio.Future[dict[str, np.ndarray]]] = {}
        # a waiting item's work entry (stream, entry id), once admitted: after a lost reply
        # channel, an entry gone means its reply was lost too (reply_loss.py)
        self._entry_of: dict[str, tuple[str, bytes]] = {}
        self._reply_loss = ReplyLoss(f"replica {self.replica}")
        self._recheck: asyncio.Task[None] | None = None
        # a waiting item's batch seconds, from its reply (WorkItem.run_s; kept until its
        # submit_many takes it)
        self._run_s: dict[str, float] = {}
        self._depth: dict[str, int] = {}
        # That depth per lane: a request counts only its own lane's and those before it.
        self._lane_depth: dict[str, dict[str, int]] = {}
        # Per model: seconds per sequence of all the live workers serving its layout, from
        # the paces they publish (absent: none measured yet).
        self._seq_s: dict[str, float] = {}
        # stream key P:{model}:v1:e<h>:b3[:explain] -> (model, "1", "3", lane), parsed once
        self._labels_of: dict[str, tuple[str, str, str, str]] = {}
        self._subscribed = False
        self._ping_ok = False
        # Why Redis could not be used, last time it could not (for the "not reachable" line),
        # and per loop the refusal last logged (a wrong password or ACL logs once, not at
        # every retry; an ACL that denies only the reply channel leaves the probe healthy).
        self._failure: str | None = None
        self._refusal_logged: dict[str, str | None] = {"reply channel": None, "probe": None}
        self._resubscribe = False
        self._closing = False
        self._closed = False  # the clients are closed: nothing may use them any more
        self._workers_key = workers_key(settings.redis_prefix)
        self.workers_alive: int | None = None  # None until the first health probe
        # per model: live workers serving the layout (version, bucket edges) enqueued for
        self.model_workers_alive: dict[str, int] = {}
        self.no_worker_grace_s = NO_WORKER_GRACE_S
        self._no_workers = _Absence()
        self._unserved = {name: _Absence() for name in manifests}
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[object]] = set()
        self._ready_event = asyncio.Event()
        self._admitting = self._admission_pipeline()
        # plain counters (tests, logs): replies dropped because nobody waited any more, etc.
        self.stats: dict[str, int] = {"late_replies": 0, "bad_replies": 0, "reconnects": 0}
        self._client = make_client(settings)
        # The listener gets its own client without redis-py's silent reconnect: a dropped
        # subscription must be noticed, because replies published meanwhile are lost.
        self._sub_client = make_client(settings, retries=0, max_connections=2)
        # The probe has its own connection: it must not queue behind a busy request pool.
        # One retry: a pooled connection that went stale in a Redis restart is not "down".
        self._health_client = make_client(settings, retries=1, max_connections=2)
        self._admit = self._client.register_script(ADMIT_LUA)
        self._client_counts: RedisClientCounts | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._ready_event = asyncio.Event()
        self._admitting = self._admission_pipeline()  # a fresh one (closed by close())
        self._tasks = [
            asyncio.create_task(self._listen_loop(), name="redis-reply-listener"),
            asyncio.create_task(self._health_loop(), name="redis-health"),
        ]
        # Redis may start later than the API ("any order"): do not fail, just be not-ready.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready_event.wait(), timeout=2.0)
        if not self._ready:
            log.warning(
                "Redis at %s not reachable yet (%s); /readyz stays false until it is",
                safe_url(self.settings.redis_url),
                self._failure or "no answer yet",
            )

    async def close(self, drain_timeout_s: float = 10.0) -> None:
        self._closing = True
        end = time.monotonic() + drain_timeout_s
        while self._waiting and time.monotonic() < end:
            await asyncio.sleep(0.02)
        self._fail_waiting(BackendUnavailableError("the service is shutting down"))
        await asyncio.sleep(0)  # the failed requests delete their entries (_forget)
        # Admissions queued or in flight: nobody would read their answers.
        await self._admitting.close(BackendUnavailableError("the service is shutting down"))
        tasks = [*self._tasks, *([self._recheck] if self._recheck else [])]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._background:  # deletions of abandoned entries: workers must not run them
            await asyncio.wait(self._background, timeout=1.0)
        self._closed = True
        for c in (self._client, self._sub_client, self._health_client):
            with contextlib.suppress(Exception):
                await c.aclose()

    @property
    def _ready(self) -> bool:
        return self._subscribed and self._ping_ok and not self._closing

    async def is_ready(self) -> bool:
        return self._ready

    def depth(self, model: str) -> int:
        """Entries in the model's streams (queued + being processed) at this replica's last
        submit; every replica shares the same streams, so this is a cluster-wide number."""
        return self._depth.get(model, 0)

    def refuse(
        self, model: str, n: int, deadline: float, lane: str | None = PREDICT_LANE
    ) -> QueueFullError | None:
        """:func:`~service.queueing.base.load_refusal` from what this replica last saw
        (the streams' lengths, refreshed by every admission and every health probe, and the
        workers' published paces), without a round trip; the admission script still applies
        the depth limit exactly."""
        if model not in self._streams:
            return None
        depth = self._depth.get(model, 0)
        return load_refusal(
            model,
            n,
            deadline,
            depth=depth,
            limit=self.settings.max_queue_depth,
            ahead=self._ahead(model, lane),
            seq_s=self._seq_s.get(model),
            retry_after=lambda: self._retry_after(model),
        )

    def _ahead(self, model: str, lane: str | None) -> int:
        per_lane = self._lane_depth.get(model, {})
        return sum(per_lane.get(ln, 0) for ln in lanes_through(lane))

    def _lane_read(self, model: str, lane: str) -> bool:
        """Whether every live worker of the model's layout reads ``lane``'s streams: else
        (a worker of an earlier version, mid-rollout) its work goes to the predict lane, which
        every worker reads: it loses its priority for a while rather than wait to its
        deadline in a stream that worker never reads."""
        if lane not in ANNOUNCED_LANES:
            return True
        readers = self._lane_readers.get((model, lane))
        return readers is not None and readers >= self.model_workers_alive.get(model, 0)

    def _retry_after(self, model: str) -> float:
        # Time to drain the model's streams at the workers' recent pace, at least a second.
        seq_s = self._seq_s.get(model)
        if seq_s is None:
            return RETRY_AFTER_S
        return max(RETRY_AFTER_S, math.ceil(seq_s * self._depth.get(model, 0)))

    def unavailable(self) -> BackendUnavailableError | None:
        """Why nothing can be queued now (shutting down, Redis unreachable), else None."""
        if self._closing:
            return BackendUnavailableError("the service is shutting down")
        if not self._ready:
            return BackendUnavailableError("the queue backend (Redis) is unreachable")
        return None

    def failed(self, e: RedisError | OSError) -> BackendUnavailableError:
        """The 503 for a command that ``e`` failed."""
        if isinstance(e, RedisConnectionError | OSError):
            self._ping_ok = False  # not ready until the health loop sees Redis again
            return BackendUnavailableError(f"the queue backend (Redis) is unreachable: {e}")
        return BackendUnavailableError(_redis_failure(e))  # a timeout, or OOM: it refuses

    def shared_in_flight(self) -> RedisClientCounts:
        if self._client_counts is None:
            self._client_counts = RedisClientCounts(self, self._client)
        return self._client_counts

    def shared_rate(self) -> RedisClientCounts:
        return self.shared_in_flight()  # its pipeline carries the buckets' scripts too

    # ------------------------------------------------------------------ submit
    async def submit(self, item: WorkItem) -> dict[str, np.ndarray]:
        return (await self.submit_many([item]))[0]

    async def submit_many(self, items: list[WorkItem]) -> list[dict[str, np.ndarray]]:
        """Queue all of ``items`` or none of them (per model: one atomic admission)."""
        if not items:
            return []
        if (unavailable := self.unavailable()) is not None:
            raise unavailable
        by_model: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            if it.model not in self._streams:
                raise KeyError(f"model {it.model!r} is not served")
            if it.id in self._waiting:
                raise ValueError(f"work item id {it.id} is already in flight")
            by_model.setdefault(it.model, []).append(i)
        for model in by_model:
            if (why := self.no_workers_refusal(model)) is not None:
                raise NoWorkersError(why)
        now = time.monotonic()
        deadline = min(it.deadline for it in items)
        # Lanes run in priority order: only its own and higher lanes are ahead of a request.
        lane = request_lane([it.lane for it in items])
        for model, idx in by_model.items():
            if (refused := self.refuse(model, len(idx), deadline, lane)) is not None:
                raise refused
        if deadline <= now:
            raise DeadlineExceededError("the request's deadline passed before it was queued")

        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[dict[str, np.ndarray]]] = []
        for it in items:
            fut: asyncio.Future[dict[str, np.ndarray]] = loop.create_future()
            self._waiting[it.id] = fut
            futures.append(fut)
        admitted: list[tuple[str, bytes]] = []
        ok = False
        try:
            async with asyncio.timeout(deadline - now):
                for model, idx in by_model.items():
                    entries = await self._admit_model(model, [items[i] for i in idx])
                    admitted += entries
                    for i, entry in zip(idx, entries, strict=True):
                        self._entry_of[items[i].id] = entry
                results = await results_of(futures)
            ok = True
            for it in items:
                it.run_s = self._run_s.get(it.id, 0.0)
            return results
        except TimeoutError:
            raise DeadlineExceededError(
                "not served before the request deadline "
                f"({(deadline - now) * 1000:.0f} ms were left when it was queued)"
            ) from None
        finally:
            for it, fut in zip(items, futures, strict=True):
                self._waiting.pop(it.id, None)
                self._entry_of.pop(it.id, None)
                self._run_s.pop(it.id, None)
                if not fut.done():
                    fut.cancel()
                elif not fut.cancelled():
                    fut.exception()  # mark retrieved: only the first error is raised
            if not ok and admitted:
                # Deadline, client gone (cancelled), a failed sibling or Redis lost: delete
                # the entries so a worker that has not read them yet never runs them, and
                # tell the workers, which drop those they hold and have not run yet.
                self._forget(admitted)
            self._count_out(admitted)

    async def _admit_model(self, model: str, items: list[WorkItem]) -> list[tuple[str, bytes]]:
        keys = list(self._streams[model])
        args: list[bytes | str | int] = [
            self.settings.max_queue_depth,
            self.settings.redis_stream_maxlen,
            len(items),
        ]
        targets = []
        for it in items:
            lane = it.lane if self._lane_read(model, it.lane) else PREDICT_LANE
            target = work_stream(self.prefix, model, self._layouts[model], it.bucket, lane)
            if target not in keys:  # a bucket/lane this replica did not expect: still queue it
                keys.append(target)
            targets.append(target)
            fields = codec.encode_work(it, self.channel, offset=self.clock.offset)
            args += [keys.index(target) + 1, 2 * len(fields)]
            for k, v in fields.items():
                args += [k, v]
        # From here a worker may read and run them (the request's items share one Reach).
        reach = items[0].reach
        before = reach is not None and reach.reached
        if reach is not None:
            reach.reached = True
        try:
            res = await self._pipelined_admit(keys, args, targets)
        except (RedisError, OSError) as e:
            if reach is not None and isinstance(e, ResponseError):
                # an error reply (out of memory, an ACL, a read-only replica): the script
                # did not run, none was queued; no answer at all (a timeout) may have
                reach.reached = before
            raise self.failed(e) from e
        depth, lens, ids = int(res[0]), res[1], res[2:]
        self._depth[model] = depth
        self._record_depth(model, keys, lens)
        if not ids:
            if reach is not None:  # refused by the script: none of them was queued
                reach.reached = before
            raise depth_refusal(
                model, depth, len(targets), self.settings.max_queue_depth, self._retry_after(model)
            )
        return list(zip(targets, ids, strict=True))

    async def _pipelined_admit(
        self, keys: list[str], args: list[bytes | str | int], targets: list[str]
    ) -> list[Any]:
        """Run the admission script in the next pipeline sent (service/queueing/autopipeline.py:
        the admissions waiting while a round trip is in flight go out together in the next)."""
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        return list(await self._admitting.call(_Admission(keys, args, targets, fut)))

    def _admission_pipeline(self) -> AutoPipeline[_Admission]:
        # A cancelled admission's XADDs are undone (their entries deleted before a worker
        # runs them); one not yet sent is not sent.
        return AutoPipeline(self._run_admissions, "redis-admit", gave_up=self._undo)

    def _undo(self, admission: _Admission, res: list[Any]) -> None:
        """An admission whose request gave up as its script ran: undo the XADDs (the
        request never learns their ids to delete them)."""
        self._forget(list(zip(admission.targets, res[2:], strict=False)))

    async def _run_admissions(self, batch: list[_Admission]) -> list[Any]:
        for attempt in range(2):
            async with self._client.pipeline(transaction=False) as pipe:
                for a in batch:
                    pipe.evalsha(self._admit.sha, len(a.keys), *a.keys, *a.args)
                results = await pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in results):
                # Redis restarted (scripts are not persisted): load it and redo the batch;
                # a NOSCRIPT reply means that admission did not run, so redoing is safe.
                await self._client.script_load(ADMIT_LUA)
                continue
            return list(results)
        return list(results)

    def _count_out(self, entries: list[tuple[str, bytes]]) -> None:
        """Take ``entries`` (admitted here, now answered or forgotten: a worker deletes an
        entry with its reply, :meth:`_forget` the rest) out of the depth last seen, at once:
        until the next probe they would count as work ahead of this replica's next request
        (a client's next batch refused for the one just answered)."""
        for stream, _ in entries:
            model, _, _, lane = self._labels(stream)
            self._depth[model] = max(0, self._depth.get(model, 0) - 1)
            per_lane = self._lane_depth.setdefault(model, {})
            per_lane[lane] = max(0, per_lane.get(lane, 0) - 1)

    def _labels(self, stream: str) -> tuple[str, str, str, str]:
        if (got := self._labels_of.get(stream)) is None:
            got = self._labels_of[stream] = stream_labels(stream)
        return got

    def _record_depth(self, model: str, keys: list[str], lens: list[int]) -> None:
        per_lane: dict[str, int] = {}
        for key, n in zip(keys, lens, strict=False):
            lane = self._labels(key)[3]
            per_lane[lane] = per_lane.get(lane, 0) + int(n)
        self._lane_depth[model] = per_lane
        if self.metrics is None:
            return
        per_bucket: dict[str, int] = {}
        for key, n in zip(keys, lens, strict=False):
            bucket = self._labels(key)[2]
            per_bucket[bucket] = per_bucket.get(bucket, 0) + int(n)
        for bucket, n in per_bucket.items():
            self.metrics.child(self.metrics.queue_depth, model, bucket).set(n)
        for lane, n in per_lane.items():
            self.metrics.set_lane_depth(model, lane, n)

    def _forget(self, entries: list[tuple[str, bytes]]) -> None:
        if self._closed or not entries:
            return
        task = asyncio.get_running_loop().create_task(self._xdel(entries))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _xdel(self, entries: list[tuple[str, bytes]]) -> None:
        with contextlib.suppress(RedisError, OSError):
            async with self._client.pipeline(transaction=False) as pipe:
                for stream, entry_id in entries:
                    pipe.xdel(stream, entry_id)
                # Best effort: a worker that misses it runs the entries (the reply is
                # dropped here as late), which at-least-once delivery allows.
                pipe.publish(cancel_channel(self.settings.redis_prefix), encode_cancel(entries))
                await pipe.execute()

    # ------------------------------------------------------------------ replies
    def _on_reply(self, data: bytes) -> None:
        try:
            reply = codec.decode_reply(data)
        except codec.CodecError as e:
            self.stats["bad_replies"] += 1
            log.warning("dropping an undecodable reply: %s", e)
            return
        fut = self._waiting.pop(reply.id, None)
        if fut is None or fut.done():
            self.stats["late_replies"] += 1  # timed out, cancelled, or a duplicate
            return
        if reply.status == codec.STATUS_OK:
            if reply.run_s:
                self._run_s[reply.id] = reply.run_s
            fut.set_result(reply.outputs)
        elif reply.status == codec.STATUS_EXPIRED:
            fut.set_exception(DeadlineExceededError("the request deadline passed in the queue"))
        else:
            fut.set_exception(InferenceFailedError(reply.error or "inference failed", reply.id))

    def _fail_waiting(self, error: Exception) -> None:
        waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(error)

    def _fail_lost(self, ids: list[str]) -> None:
        """Answer 503 the requests among ``ids`` still waiting: their replies were lost."""
        for i in ids:
            fut = self._waiting.pop(i, None)
            if fut is not None and not fut.done():
                fut.set_exception(BackendUnavailableError(LOST))

    def _waiting_entry(self, item_id: str) -> tuple[str, bytes] | None:
        return self._entry_of.get(item_id) if item_id in self._waiting else None

    def _reply_channel_lost(self) -> None:
        if self._recheck is not None:  # lost again while checking: all checked again later
            self._recheck.cancel()
            self._recheck = None
        self._reply_loss.lost(set(self._waiting))

    def _reply_channel_back(self) -> None:
        if self._reply_loss.suspects:
            self._recheck = asyncio.get_running_loop().create_task(self._recheck_replies())
        else:
            self._reply_loss.since = None

    async def _recheck_replies(self) -> None:
        try:
            await self._reply_loss.recheck(self._client, self._waiting_entry, self._fail_lost)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # Redis away again: nothing to go by, answer them now
            log.warning("could not check the requests waiting for lost replies (%r)", e)
            self._fail_lost(list(self._reply_loss.give_up()))

    async def _listen_loop(self) -> None:
        """The replica's single reply listener; resubscribes by itself after any failure."""
        delay = 0.05
        while not self._closing:
            pubsub = self._sub_client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                self._resubscribe = False
                while not self._resubscribe:
                    msg = await pubsub.get_message(timeout=LISTEN_POLL_S)
                    if msg is None:
                        continue
                    if msg["type"] == "message":
                        self._on_reply(msg["data"])
                    elif msg["type"] == "subscribe":
                        self._subscribed = True
                        self._refusal_logged["reply channel"] = None
                        delay = 0.05
                        self._reply_channel_back()
                        self._update_ready()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # connection refused/reset, timeouts: retry below
                self._note_failure("reply channel", e)
                if self._subscribed:
                    log.warning("lost the Redis reply channel (%s); resubscribing", e)
            finally:
                if self._subscribed:
                    self.stats["reconnects"] += 1
                    # Replies published while unsubscribed are lost: once subscribed again,
                    # the requests whose entries are gone are answered 503 (reply_loss.py).
                    self._reply_channel_lost()
                self._subscribed = False
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _health_loop(self) -> None:
        slow = 0
        while not self._closing:
            try:
                await asyncio.wait_for(
                    self._sample_depths(), timeout=self.settings.redis_socket_timeout_s
                )
                if not self._ping_ok:
                    log.info("Redis at %s reachable", safe_url(self.settings.redis_url))
                self._ping_ok = True
                self._refusal_logged["probe"] = None
                slow = 0
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._note_failure("probe", e)
                slow += 1
                timeout = isinstance(e, TimeoutError | RedisTimeoutError)
                if not timeout or slow >= HEALTH_TIMEOUTS_TO_FAIL:
                    if self._ping_ok:
                        log.warning("Redis unreachable (%r); not ready", e)
                    self._ping_ok = False
                    # a silent network drop leaves the subscription dead without an error
                    self._resubscribe = True
            if not self._subscribed and self._reply_loss.overdue():
                # no way to tell which replies were lost: better a retryable error than a
                # hang to the deadline
                self._fail_lost(list(self._reply_loss.give_up()))
            self._update_ready()
            await asyncio.sleep(HEALTH_INTERVAL_S if self._ping_ok else HEALTH_INTERVAL_S / 2)

    def _note_failure(self, what: str, e: Exception) -> None:
        """Remember why Redis could not be used; log a refusal (wrong password, a command,
        key or channel the ACL user may not use) once: it is no outage that retries cure."""
        self._failure = f"{type(e).__name__}: {e}"
        if not isinstance(e, ResponseError | AuthenticationError):
            return
        if self._refusal_logged[what] != self._failure:
            self._refusal_logged[what] = self._failure
            log.warning(
                "Redis at %s refused the %s (%s): check the user and ACL rules of "
                "NLPSERVE_REDIS_URL (docs/deploy.md, Production Redis)",
                safe_url(self.settings.redis_url),
                what,
                self._failure,
            )

    async def _sample_depths(self) -> None:
        """The health probe: one pipelined round trip that samples the offset to Redis'
        clock (``TIME``, which serves as the ping), counts the live workers, and refreshes
        :meth:`depth` and the queue-depth gauges (one XLEN per stream) while this replica
        submits nothing."""
        if not self.clock.measured:  # the worker counts below are judged on Redis' clock
            await self.clock.sync(self._health_client)
        async with self._health_client.pipeline(transaction=False) as pipe:
            self.clock.sample(pipe)
            alive_since = self.clock.now() - WORKER_ALIVE_S
            pipe.zcount(self._workers_key, alive_since, "+inf")
            for key in self._served_keys.values():
                pipe.zcount(key, alive_since, "+inf")
            for streams in self._streams.values():
                for s in streams:
                    pipe.xlen(s)
            for key in self._pace_keys.values():
                pipe.hgetall(key)
            for key in self._readers_keys.values():
                pipe.zcount(key, alive_since, "+inf")
            sent = time.monotonic()
            res = await pipe.execute(raise_on_error=False)
        self.clock.take(sent, res[0], time.monotonic())
        if errors := self.clock.errors(res):
            raise errors[0]
        # whether each announced lane was read, before this probe's counts (a replica that
        # starts mid-rollout warns too)
        before = {
            key: key not in self._lane_readers or self._lane_read(*key)
            for key in self._readers_keys
        }
        k = 2 + len(self._served_keys)
        served = res[2:k]
        self._count_workers(
            int(res[1]), {m: int(n) for m, n in zip(self._served_keys, served, strict=True)}
        )
        for model, streams in self._streams.items():
            lens = res[k : k + len(streams)]
            k += len(streams)
            self._depth[model] = sum(int(n) for n in lens)
            self._record_depth(model, streams, lens)
        for model, paces in zip(self._pace_keys, res[k : k + len(self._pace_keys)], strict=True):
            self._record_pace(model, paces, alive_since)
        k += len(self._pace_keys)
        self._lane_readers = {
            key: int(n) for key, n in zip(self._readers_keys, res[k:], strict=True)
        }
        for (model, lane), was in before.items():
            if was != (now := self._lane_read(model, lane)):
                log.log(
                    logging.INFO if now else logging.WARNING,
                    "%s's %s-priority work goes to its %s lane: %s",
                    model,
                    lane,
                    lane if now else PREDICT_LANE,
                    "every live worker reads it again"
                    if now
                    else "a live worker does not read that lane (an earlier version)",
                )

    def _record_pace(self, model: str, paces: dict[bytes, bytes], alive_since: float) -> None:
        """The model's seconds per sequence over all its live workers: each runs
        ``threads / seconds per sequence`` sequences a second."""
        rate = 0.0
        for value in paces.values():
            pace = decode_pace(value)
            if pace is not None and pace[2] >= alive_since:
                rate += pace[1] / pace[0]
        if rate > 0:
            self._seq_s[model] = 1.0 / rate
        else:
            self._seq_s.pop(model, None)

    def no_workers_refusal(self, model: str | None = None) -> str | None:
        limit = self.settings.redis_no_worker_fail_s
        if limit is None:
            return None
        now = time.monotonic()
        if (gone := self._no_workers.lasted(now)) >= limit:
            return (
                f"no inference worker has been alive for {gone:.0f} s (NLPSERVE_REDIS_NO_"
                "WORKER_FAIL_S): not queued; retry when workers are back"
            )
        if model is not None and (gone := self._unserved[model].lasted(now)) >= limit:
            return (
                f"no inference worker serving {self._served_what(model)} has been alive for "
                f"{gone:.0f} s (workers alive: {self.workers_alive}, serving other models, "
                "versions or bucket edges; NLPSERVE_REDIS_NO_WORKER_FAIL_S): not queued; retry "
                "when one is back"
            )
        return None

    def _served_what(self, model: str) -> str:
        return f"{model}/{self._versions[model]} with buckets {self._edges[model]}"

    def _waiting_fate(self) -> str:
        if self.settings.redis_no_worker_fail_s is None:
            return "its requests wait for one until their deadline"
        return (
            f"its requests are refused (503 no_workers) once that has lasted "
            f"NLPSERVE_REDIS_NO_WORKER_FAIL_S ({self.settings.redis_no_worker_fail_s:g} s)"
        )

    def _count_workers(self, alive: int, per_model: dict[str, int]) -> None:
        # Not a readiness condition: replicas and workers start in any order, and work
        # queued meanwhile is served when a worker comes (or 504 at its deadline). The log
        # lines wait NO_WORKER_GRACE_S: at startup and after a Redis restart (the heartbeat
        # sets are gone until the next beats) the counts are 0 for a moment while workers
        # are fine.
        now, grace = time.monotonic(), self.no_worker_grace_s
        if self._no_workers.update(alive, now, grace):
            log.warning(
                "no live inference worker (none has beaten within %.0f s): %s (start "
                "`nlpserve worker`, with the same NLPSERVE_REDIS_PREFIX)",
                WORKER_ALIVE_S,
                self._waiting_fate().replace("its requests", "requests"),
            )
        for model, count in per_model.items():
            # while no worker at all is alive, the line above says it for every model
            if self._unserved[model].update(count or not alive, now, grace):
                log.warning(
                    "no inference worker serves %s (workers alive: %d, serving other models, "
                    "versions or bucket edges): %s; start a worker that loads that version "
                    "with the same NLPSERVE_BUCKETS",
                    self._served_what(model),
                    alive,
                    self._waiting_fate(),
                )
        self.workers_alive = alive
        self.model_workers_alive = per_model
        if self.metrics is not None:
            self.metrics.workers_alive().set(alive)
            for model, count in per_model.items():
                self.metrics.model_workers_alive().labels(model, self._versions[model]).set(count)

    def _update_ready(self) -> None:
        if self._ready:
            self._ready_event.set()

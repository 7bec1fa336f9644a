"""Each client's items in flight across every API replica, in Redis
(``NLPSERVE_CLIENT_QUOTA_SCOPE=global``, service/api/client_quota.py).

Per client one sorted set (``P:client:{name}:in-flight``, redis_keys.py) holds a member per
item admitted and not yet answered, ``<request id>:<i>``, scored by the Unix time (Redis'
clock, service/clock.py) at which it stops counting: the request's deadline and a margin. One
script admits a request's items atomically (every replica's admissions of the client are
ordered by Redis), and once: sent again (redis-py's retry after a lost answer) it finds its
members and is admitted; a ``ZREM`` of its members releases them. A member per item, not per
request: the script then sums with ``ZCOUNT`` and the ACL rule of docs/deploy.md needs no new
command. A replica that dies holding items leaves members that stop counting at their
deadline; the set expires with its last member, so an idle client leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from service.queueing.base import SharedInFlight
from service.queueing.redis_keys import client_in_flight_key

if TYPE_CHECKING:
    from service.queueing.redis_queue import RedisQueue

log = logging.getLogger(__name__)

# Past its deadline a request is answered (504) at once and releases its items then: the
# margin covers the release's way to Redis and the replicas' clock estimates, so that only
# the items of a replica that died (or lost Redis) meanwhile ever expire.
EXPIRY_MARGIN_S = 5.0

# KEYS: the client's set. ARGV: now (Redis' clock), expiry of these items, limit, n, seconds
# the set must live for them, request id. Returns {1 admitted / 0 refused, count held before}.
ACQUIRE_LUA = """
local key, now, expiry = KEYS[1], ARGV[1], ARGV[2]
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
local held = redis.call('ZCOUNT', key, '-inf', '+inf')
local n = tonumber(ARGV[4])
-- this admission again: redis-py sends a command once more when its answer was lost (a
-- timeout, a reset connection), after the script ran. Admitted then: refused by its own
-- items, they would stay counted, never released, until they expire
if redis.call('ZMSCORE', key, ARGV[6] .. ':1')[1] then return {1, held - n} end
if held + n > tonumber(ARGV[3]) then return {0, held} end
-- the set's TTL covers its latest expiry: set by the admission that brought that one
local later = redis.call('ZCOUNT', key, '(' .. expiry, '+inf')
-- 256 members per ZADD: Lua's unpack has a bounded stack
for first = 1, n, 256 do
  local args = {}
  for i = first, math.min(first + 255, n) do
    args[#args + 1] = expiry
    args[#args + 1] = ARGV[6] .. ':' .. i
  end
  redis.call('ZADD', key, unpack(args))
end
if later == 0 then redis.call('EXPIRE', key, ARGV[5]) end
return {1, held}
"""


def members(token: str, n: int) -> list[str]:
    return [f"{token}:{i}" for i in range(1, n + 1)]


@dataclass
class _Command:
    key: str
    args: list[str | int]  # the script's ARGV (acquire), or the members to remove (release)
    acquire: bool
    fut: asyncio.Future[Any]


class RedisClientCounts(SharedInFlight):
    """:class:`SharedInFlight` on the Redis of ``queue`` (its client and clock; its
    readiness and failures are this one's: the same 503 a request would get from the queue).

    Auto-pipelined, as the queue's admissions: the acquires and releases of one event-loop
    moment share one round trip. A redis-py command costs the event loop ~0.1 ms of CPU on
    its own; under load most of a request's two go out with others'."""

    def __init__(self, queue: RedisQueue, client: Redis) -> None:
        self.queue = queue
        self.client = client
        self.margin_s = EXPIRY_MARGIN_S
        self._script = client.register_script(ACQUIRE_LUA)
        self._pending: list[_Command] = []
        self._sending: asyncio.Task[None] | None = None
        self._releases: set[asyncio.Task[None]] = set()

    def key(self, client: str) -> str:
        return client_in_flight_key(self.queue.prefix, client)

    async def acquire(
        self, client: str, token: str, n: int, limit: int, deadline: float
    ) -> tuple[bool, int]:
        if (unavailable := self.queue.unavailable()) is not None:
            raise unavailable
        clock = self.queue.clock
        now = clock.now()
        expiry = deadline + clock.offset + self.margin_s
        ttl = max(1, math.ceil(expiry - now) + 1)
        args: list[str | int] = [repr(now), repr(expiry), limit, n, ttl, token]
        try:
            admitted, held = await self._send(self.key(client), args, acquire=True)
        except (RedisError, OSError) as e:
            # No answer, but the script may have run (Redis slower than the socket timeout,
            # redis-py's retry too; it runs once Redis is free): its items go back, as a
            # cancelled admission's do, sent after it on the same sequence of pipelines
            task = asyncio.get_running_loop().create_task(self.release(client, token, n))
            self._releases.add(task)  # held until done: the loop keeps a weak reference
            task.add_done_callback(self._releases.discard)
            raise self.queue.failed(e) from e
        return bool(admitted), int(held)

    async def release(self, client: str, token: str, n: int) -> None:
        try:
            await self._send(self.key(client), list(members(token, n)), acquire=False)
        except (RedisError, OSError) as e:
            # they stop counting at their deadline; the queue's own failure says more
            log.debug("could not release %d items of %s in Redis (%r)", n, client, e)

    def _send(self, key: str, args: list[str | int], *, acquire: bool) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending.append(_Command(key, args, acquire, fut))
        if self._sending is None or self._sending.done():
            self._sending = loop.create_task(self._send_loop(), name="redis-client-counts")
        return fut

    async def _send_loop(self) -> None:
        """Send what is pending, one pipeline at a time, until nothing is."""
        while self._pending:
            # an acquire whose request gave up before it went out: not sent (its release is,
            # and finds nothing); a release always is
            batch = [c for c in self._pending if not (c.acquire and c.fut.cancelled())]
            self._pending = []
            if not batch:
                continue
            try:
                results = await self._run(batch)
            except Exception as e:  # the connection lost etc.: each command raises it
                results = [e] * len(batch)
            for c, res in zip(batch, results, strict=True):
                if c.fut.done():
                    continue
                if isinstance(res, Exception):
                    c.fut.set_exception(res)
                else:
                    c.fut.set_result(res)

    async def _run(self, batch: list[_Command]) -> list[Any]:
        if len(batch) == 1:  # alone: a plain command costs less than a pipeline of one
            c = batch[0]
            if c.acquire:
                return [await self._script(keys=[c.key], args=c.args)]  # NOSCRIPT: loads it
            return [await self.client.zrem(c.key, *c.args)]
        for attempt in range(2):
            async with self.client.pipeline(transaction=False) as pipe:
                for c in batch:
                    if c.acquire:
                        pipe.evalsha(self._script.sha, 1, c.key, *c.args)
                    else:
                        pipe.zrem(c.key, *c.args)
                results = await pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in results):
                # Redis restarted (scripts are not persisted): load it and send the batch
                # again; no script ran, and a release again removes nothing more
                await self.client.script_load(ACQUIRE_LUA)
                continue
            return list(results)
        return list(results)

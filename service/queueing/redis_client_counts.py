"""Each client's items in flight across every API replica, in Redis
(``NLPSERVE_CLIENT_QUOTA_SCOPE=global``, service/api/client_quota.py).

Per client one sorted set (``P:client:{name}:in-flight``, redis_keys.py) holds a member per
item admitted and not yet answered, ``<request id>:<i>``, scored by the Unix time (Redis'
clock, service/clock.py) at which it stops counting: the request's deadline and a margin. One
script admits a request's items atomically (every replica's admissions of the client are
ordered by Redis), and once: sent again (redis-py's retry after a lost answer) it finds its
members and is admitted. Another script releases them; where the admission got no answer
(Redis busy past both of redis-py's tries: it may still run, and the release, sent on
another connection, may overtake it) the release also leaves the request id as a tombstone,
scored minus the items' time (below 0: never counted), and an admission that Redis runs after
it finds it and adds nothing. A member per item, not per
request: the script then sums with ``ZCOUNT`` and the ACL rule of docs/deploy.md needs no new
command. A replica that dies holding items leaves members that stop counting at their
deadline; the set expires with its last member, so an idle client leaves nothing behind.

Each client's token bucket (its rate limit, service/api/client_rate.py) is a hash
(``P:client:{name}:rate``: ``tokens``, and ``last``, the Redis time they were counted at) that
one script refills and takes from (HGETALL, HSET, EXPIRE: nothing beyond the ACL rule); it
expires once it would be full again, as absent as a full bucket is.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from service.queueing.autopipeline import AutoPipeline
from service.queueing.base import SharedInFlight, SharedRate
from service.queueing.redis_keys import (
    client_in_flight_key,
    client_rate_ids_key,
    client_rate_key,
)

if TYPE_CHECKING:
    from service.queueing.redis_queue import RedisQueue

log = logging.getLogger(__name__)

# Past its deadline a request is answered (504) at once and releases its items then: the
# margin covers the release's way to Redis and the replicas' clock estimates, so that only
# the items of a replica that died (or lost Redis) meanwhile ever expire.
EXPIRY_MARGIN_S = 5.0

# KEYS: the client's set. ARGV: now (Redis' clock), expiry of these items, limit (below 0:
# none, items admitted before the client had one), n, seconds the set must live for them,
# request id. Returns {1 admitted / 0 refused, count held before}.
ACQUIRE_LUA = """
local key, now, expiry = KEYS[1], ARGV[1], ARGV[2]
-- items score their expiry (above 0), tombstones minus theirs (below 0): both gone by now
redis.call('ZREMRANGEBYSCORE', key, '-' .. now, now)
local held = redis.call('ZCOUNT', key, '(0', '+inf')
local n, limit = tonumber(ARGV[4]), tonumber(ARGV[3])
local seen = redis.call('ZMSCORE', key, ARGV[6] .. ':1', ARGV[6])
-- this admission again: redis-py sends a command once more when its answer was lost (a
-- timeout, a reset connection), after the script ran. Admitted then: refused by its own
-- items, they would stay counted, never released, until they expire
if seen[1] then return {1, held - n} end
-- released already (this admission ran late, overtaken): nobody waits for its answer
if seen[2] then return {0, held} end
if limit >= 0 and held + n > limit then return {0, held} end
-- the set's TTL covers its latest expiry (an item's or a tombstone's): set by the command
-- that brought that one
local later = redis.call('ZCOUNT', key, '(' .. expiry, '+inf')
  + redis.call('ZCOUNT', key, '-inf', '(-' .. expiry)
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

# KEYS: the client's set. ARGV: the request id, n, its items' expiry, seconds the set must
# live for it, 1 to leave a tombstone (its admission unanswered) else 0. Deletes the items;
# the tombstone lasts until the items' expiry, after which a late admission's items are
# expired on arrival. Returns the items deleted.
RELEASE_LUA = """
local key, token, n, expiry = KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3]
local removed = 0
for first = 1, n, 256 do
  local args = {}
  for i = first, math.min(first + 255, n) do args[#args + 1] = token .. ':' .. i end
  removed = removed + redis.call('ZREM', key, unpack(args))
end
if ARGV[5] == '1' then
  local later = redis.call('ZCOUNT', key, '(' .. expiry, '+inf')
    + redis.call('ZCOUNT', key, '-inf', '(-' .. expiry)
  redis.call('ZADD', key, '-' .. expiry, token)
  if later == 0 then redis.call('EXPIRE', key, ARGV[4]) end
end
return removed
"""


# Takes and refunds are not idempotent: redis-py sends a script again when its answer was
# lost (a timeout, a reset connection: Retry in make_client), after it may have run. Each
# carries an id, kept in a sorted set beside the bucket (scored by the Unix time it may be
# forgotten at) once it changed the bucket: run again, it finds it and changes nothing. A
# take taken twice charged 2n, and its second run, short of tokens, answered the request
# 429 for the n its first had taken; a refund gave back twice.
IDS_LUA = """
local ids, id, now = KEYS[2], ARGV[5], ARGV[1]
redis.call('ZREMRANGEBYSCORE', ids, '-inf', now)
local seen = redis.call('ZMSCORE', ids, id)[1]
local function ran()
  redis.call('ZADD', ids, tonumber(now) + tonumber(ARGV[6]), id)
  redis.call('EXPIRE', ids, math.ceil(tonumber(ARGV[6])) + 1)
end
"""

# KEYS: the client's bucket, its ids. ARGV: now (Redis' clock), rate (items a second),
# burst, n, the take's id, seconds its id is kept. Returns {1 taken / 0 refused, the tokens
# held before (a string: Redis truncates numbers); taken again: those held now}.
# A replica's estimate of Redis' clock may be behind another's: time never runs back here.
TAKE_LUA = (
    IDS_LUA
    + """
local key = KEYS[1]
local now, rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local tokens, last = burst, now
local fields = redis.call('HGETALL', key)
for i = 1, #fields, 2 do
  if fields[i] == 'tokens' then tokens = tonumber(fields[i + 1])
  elseif fields[i] == 'last' then last = tonumber(fields[i + 1]) end
end
if now > last then tokens = tokens + (now - last) * rate; last = now end
if tokens > burst then tokens = burst end
if seen then return {1, tostring(tokens)} end  -- this take again: it took already
if tokens < n then return {0, tostring(tokens)} end
redis.call('HSET', key, 'tokens', tostring(tokens - n), 'last', tostring(last))
-- gone once full again: an absent bucket is a full one
redis.call('EXPIRE', key, math.max(1, math.ceil((burst - tokens + n) / rate) + 1))
ran()
return {1, tostring(tokens)}
"""
)


# KEYS: the client's bucket, its ids. ARGV: now (Redis' clock), rate, burst, n, the
# refund's id, seconds its id is kept. Gives back the n tokens of a request none of whose
# items ran, up to the burst (once, whatever the re-sends); an absent bucket is full
# already. Returns the tokens it holds after (a string).
REFUND_LUA = (
    IDS_LUA
    + """
local key = KEYS[1]
local now, rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if seen then return 'again' end
ran()  -- even where the bucket is absent: a re-send after a take made one gives back nothing
local fields = redis.call('HGETALL', key)
if #fields == 0 then return tostring(burst) end
local tokens, last = burst, now
for i = 1, #fields, 2 do
  if fields[i] == 'tokens' then tokens = tonumber(fields[i + 1])
  elseif fields[i] == 'last' then last = tonumber(fields[i + 1]) end
end
if now > last then tokens = tokens + (now - last) * rate; last = now end
tokens = math.min(burst, tokens + tonumber(ARGV[4]))
redis.call('HSET', key, 'tokens', tostring(tokens), 'last', tostring(last))
redis.call('EXPIRE', key, math.max(1, math.ceil((burst - tokens) / rate) + 1))
return tostring(tokens)
"""
)

# How long a take's or a refund's id is kept: a re-send runs within redis-py's socket
# timeout (2 s by default) of the first run (its retry), or beside it where Redis was busy
# with both. A member per request of the client's in that time (~140 bytes each).
IDS_KEPT_S = 30.0

ACQUIRE, RELEASE, TAKE, REFUND = "acquire", "release", "take", "refund"
SCRIPTS = {ACQUIRE: ACQUIRE_LUA, RELEASE: RELEASE_LUA, TAKE: TAKE_LUA, REFUND: REFUND_LUA}


@dataclass
class _Command:
    keys: list[str]
    args: list[str | int]  # the script's ARGV
    kind: str  # ACQUIRE, RELEASE, TAKE or REFUND
    fut: asyncio.Future[Any]


class RedisClientCounts(SharedInFlight, SharedRate):
    """:class:`SharedInFlight` and :class:`SharedRate` on the Redis of ``queue`` (its client
    and clock; its readiness and failures are this one's: the same 503 a request would get
    from the queue).

    Auto-pipelined (service/queueing/autopipeline.py), as the queue's admissions: the
    acquires, takes and releases of one event-loop moment share one round trip. A redis-py
    command costs the event loop ~0.1 ms of CPU on its own; under load most of a request's
    go out with others'."""

    def __init__(self, queue: RedisQueue, client: Redis) -> None:
        self.queue = queue
        self.client = client
        self.margin_s = EXPIRY_MARGIN_S
        self._scripts = {kind: client.register_script(lua) for kind, lua in SCRIPTS.items()}
        # An acquire or take whose request gave up before it went out is not sent (an
        # acquire's release is, and leaves its tombstone); a release, a refund always is.
        self._pipeline: AutoPipeline[_Command] = AutoPipeline(
            self._run,
            "redis-client-counts",
            always_sent=lambda c: c.kind in (RELEASE, REFUND),
            gave_up=self._gave_up,
        )
        self._later_tasks: set[asyncio.Task[None]] = set()

    def key(self, client: str) -> str:
        return client_in_flight_key(self.queue.prefix, client)

    async def acquire(
        self, client: str, token: str, n: int, limit: int, deadline: float
    ) -> tuple[bool, int]:
        if (unavailable := self.queue.unavailable()) is not None:
            raise unavailable
        now, expiry, ttl = self._expiry(deadline)
        args: list[str | int] = [repr(now), repr(expiry), limit, n, ttl, token]
        try:
            admitted, held = await self._call([self.key(client)], args, ACQUIRE)
        except (RedisError, OSError) as e:
            # No answer, but the script may have run (Redis slower than the socket timeout,
            # redis-py's retry too; it runs once Redis is free): its items go back, as a
            # cancelled admission's do (the release's tombstone stops a late run of it)
            self._unanswered(client, token, n, deadline)
            raise self.queue.failed(e) from e
        return bool(admitted), int(held)

    def _unanswered(self, client: str, token: str, n: int, deadline: float) -> None:
        self._later(self.release(client, token, n, deadline, answered=False))

    async def add(self, client: str, token: str, n: int, deadline: float) -> None:
        # the admission's script without a limit (-1): these items are admitted already
        now, expiry, ttl = self._expiry(deadline)
        args: list[str | int] = [repr(now), repr(expiry), -1, n, ttl, token]
        try:
            await self._call([self.key(client)], args, ACQUIRE)
        except (RedisError, OSError) as e:
            # uncounted here until they end; a late run of it counts nothing
            log.debug("could not count %d items of %s in Redis (%r)", n, client, e)
            self._unanswered(client, token, n, deadline)

    async def take(self, client: str, n: int, rate: float, burst: int) -> tuple[bool, float]:
        if (unavailable := self.queue.unavailable()) is not None:
            raise unavailable
        try:
            taken, before = await self._call(self._bucket(client), self._rate(rate, burst, n), TAKE)
        except (RedisError, OSError) as e:
            raise self.queue.failed(e) from e
        return bool(taken), float(before)

    async def refund(self, client: str, n: int, rate: float, burst: int) -> None:
        await self._refund(self._bucket(client), self._rate(rate, burst, n))

    def _bucket(self, client: str) -> list[str]:
        prefix = self.queue.prefix
        return [client_rate_key(prefix, client), client_rate_ids_key(prefix, client)]

    def _rate(self, rate: float, burst: int, n: int) -> list[str | int]:
        """A take's or a refund's ARGV: now, and an id of its own (its re-sends run once)."""
        now = repr(self.queue.clock.now())
        return [now, repr(rate), burst, n, uuid.uuid4().hex, repr(IDS_KEPT_S)]

    async def _refund(self, keys: list[str], args: list[str | int]) -> None:
        try:
            await self._call(keys, args, REFUND)
        except (RedisError, OSError) as e:
            log.debug("could not give back %s tokens of %s in Redis (%r)", args[3], keys[0], e)

    async def release(
        self, client: str, token: str, n: int, deadline: float, answered: bool = True
    ) -> None:
        _, expiry, ttl = self._expiry(deadline)
        args: list[str | int] = [token, n, repr(expiry), ttl, 0 if answered else 1]
        try:
            await self._call([self.key(client)], args, RELEASE)
        except (RedisError, OSError) as e:
            # they stop counting at their deadline; the queue's own failure says more
            log.debug("could not release %d items of %s in Redis (%r)", n, client, e)

    def _expiry(self, deadline: float) -> tuple[float, float, int]:
        """Now and the Unix time (Redis' clock) at which items of ``deadline``
        (``time.monotonic()``) stop counting, and the seconds until then (at least 1)."""
        clock = self.queue.clock
        now = clock.now()
        expiry = deadline + clock.offset + self.margin_s
        return now, expiry, max(1, math.ceil(expiry - now) + 1)

    async def _call(self, keys: list[str], args: list[str | int], kind: str) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        return await self._pipeline.call(_Command(keys, args, kind, fut))

    def _gave_up(self, c: _Command, res: Any) -> None:
        """A command that ran for a request that gave up: a take that took gives the tokens
        back (the request's items will never run). An acquire's items are released by its
        request (ClientQuota.hold), with a tombstone."""
        if c.kind == TAKE and res[0]:
            rate, burst, n = c.args[1:4]
            self._later(self._refund(c.keys, self._rate(float(rate), int(burst), int(n))))

    def _later(self, call: Coroutine[None, None, None]) -> None:
        task = asyncio.get_running_loop().create_task(call)
        self._later_tasks.add(task)  # held until done: the loop keeps a weak reference
        task.add_done_callback(self._later_tasks.discard)

    async def _run(self, batch: list[_Command]) -> list[Any]:
        if len(batch) == 1:  # alone: a plain command costs less than a pipeline of one
            c = batch[0]
            return [await self._scripts[c.kind](keys=c.keys, args=c.args)]  # NOSCRIPT: loads it
        results = await self._pipelined(batch)
        if missing := [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]:
            # Redis lacks a script (restarted: scripts are not persisted; or the first
            # replica of a release that brought it): load them all and send again only the
            # commands it refused (the others ran).
            for script in SCRIPTS.values():
                await self.client.script_load(script)
            again = await self._pipelined([batch[i] for i in missing])
            for i, res in zip(missing, again, strict=True):
                results[i] = res
        return results

    async def _pipelined(self, batch: list[_Command]) -> list[Any]:
        async with self.client.pipeline(transaction=False) as pipe:
            for c in batch:
                pipe.evalsha(self._scripts[c.kind].sha, len(c.keys), *c.keys, *c.args)
            return list(await pipe.execute(raise_on_error=False))

"""Each client's items in flight across every API replica, in Redis
(``NLPSERVE_CLIENT_QUOTA_SCOPE=global``, service/api/client_quota.py).

Per client one sorted set (``P:client:{name}:in-flight``, redis_keys.py) holds a member per
item admitted and not yet answered, ``<request id>:<i>``, scored by the Unix time (Redis'
clock, service/clock.py) at which it stops counting: the request's deadline and a margin. One
script admits a request's items atomically (every replica's admissions of the client are
ordered by Redis); a ``ZREM`` of its members releases them. A member per item, not per
request: the script then sums with ``ZCOUNT`` and the ACL rule of docs/deploy.md needs no new
command. A replica that dies holding items leaves members that stop counting at their
deadline; the set expires with its last member, so an idle client leaves nothing behind.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from redis.asyncio import Redis
from redis.exceptions import RedisError

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


class RedisClientCounts(SharedInFlight):
    """:class:`SharedInFlight` on the Redis of ``queue`` (its client and clock; its
    readiness and failures are this one's: the same 503 a request would get from the queue)."""

    def __init__(self, queue: RedisQueue, client: Redis) -> None:
        self.queue = queue
        self.client = client
        self.margin_s = EXPIRY_MARGIN_S
        self._acquire = client.register_script(ACQUIRE_LUA)  # reloads itself on NOSCRIPT

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
        try:
            admitted, held = await self._acquire(
                keys=[self.key(client)], args=[repr(now), repr(expiry), limit, n, ttl, token]
            )
        except (RedisError, OSError) as e:
            raise self.queue.failed(e) from e
        return bool(admitted), int(held)

    async def release(self, client: str, token: str, n: int) -> None:
        try:
            await self.client.zrem(self.key(client), *members(token, n))
        except (RedisError, OSError) as e:
            # they stop counting at their deadline; the queue's own failure says more
            log.debug("could not release %d items of %s in Redis (%r)", n, client, e)

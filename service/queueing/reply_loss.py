"""Requests whose reply may have been published while a replica's reply channel was down.

Pub/sub keeps nothing for a subscriber that is away: a reply published while the replica
reconnects (a dropped connection, ``CLIENT KILL``, a Redis restart) is gone. The request's
work entry tells which requests lost one: a worker PUBLISHes a reply and only then XACKs and
XDELs the entry, so an entry still in its stream once the replica listens again has not been
answered yet (its reply will come), and an entry gone was answered meanwhile (the reply is
lost) or was lost with Redis (a restart without persistence). Those are answered 503 at once
instead of waiting for their deadline; the others keep waiting, so a dropped subscription or
a restart with persistence costs no request. While the channel stays down longer than the
grace, nothing can be checked: the requests waiting are answered 503 too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import NoPermissionError

log = logging.getLogger(__name__)

# How long requests wait for a lost reply channel to come back before they are answered 503:
# a Redis restart with persistence or a killed connection is back well within it.
REPLY_LOSS_GRACE_S = 5.0
# After an entry is seen gone, how long its reply may still be on its way (published after
# the resubscription, read by the listener after the check's answer); also how long after
# the first check the second one comes (a worker's reply pipeline caught midway, its
# PUBLISH before the resubscription and its XDEL after the first check).
SETTLE_S = 0.5

LOST = (
    "the queue backend (Redis) lost this request's work or its answer (Redis restarted or "
    "the reply channel dropped); retry"
)


class ReplyLoss:
    """The requests that were waiting when the reply channel was lost (``suspects``), until
    their entries have been checked."""

    def __init__(self, who: str) -> None:
        self.who = who
        self.grace_s = REPLY_LOSS_GRACE_S
        self.suspects: set[str] = set()
        self.since: float | None = None  # when the channel was lost, until it is back
        self._denied_logged = False

    def lost(self, waiting: set[str]) -> None:
        self.suspects |= waiting
        if self.since is None:
            self.since = time.monotonic()

    def overdue(self) -> bool:
        """The channel has been down longer than the grace."""
        return self.since is not None and time.monotonic() - self.since >= self.grace_s

    def give_up(self) -> set[str]:
        """Every suspect, to be answered 503 (the channel stayed away, or no check works)."""
        suspects, self.suspects = self.suspects, set()
        return suspects

    async def recheck(
        self,
        client: Redis,
        entry_of: Callable[[str], tuple[str, bytes] | None],
        fail: Callable[[list[str]], None],
    ) -> None:
        """Once the channel is back: ``fail`` the suspects whose entries are gone, in two
        rounds :data:`SETTLE_S` apart. ``entry_of``: a waiting request's entry (None: it is
        no longer waiting, or its admission has not returned yet)."""
        self.since = None
        for _ in range(2):
            checked = [(i, e) for i in self.suspects if (e := entry_of(i)) is not None]
            if not checked:
                break
            try:
                async with client.pipeline(transaction=False) as pipe:
                    for stream, entry_id in (e for _, e in checked):
                        pipe.xrange(stream, entry_id, entry_id, count=1)
                    found = await pipe.execute()
            except NoPermissionError as e:
                self._log_denied(e)
                fail(list(self.give_up()))
                return
            gone = [i for (i, _), got in zip(checked, found, strict=True) if not got]
            await asyncio.sleep(SETTLE_S)  # replies on their way land first
            fail(gone)
            # only now: cancelled before (the channel lost again), they are checked again
            self.suspects.difference_update(gone)
        self.suspects.clear()

    def _log_denied(self, e: Exception) -> None:
        if not self._denied_logged:
            self._denied_logged = True
            log.warning(
                "%s: the Redis user may not run XRANGE (an ACL rule written before nlpserve "
                "checked entries after a lost reply channel: %s): the requests waiting when "
                "the channel drops are all answered 503; add +xrange to the rule "
                "(docs/deploy.md)",
                self.who,
                e,
            )

"""Forming batches from one bucket's pending sequences."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable
from itertools import islice
from typing import Generic

from service.batching.types import BatchPolicy, ItemT

# How far past the oldest sequence :meth:`PendingBucket.take` looks for batch mates, in
# multiples of the max batch size: enough choice to group similar lengths, bounded work.
LOOKAHEAD_BATCHES = 4


class PendingBucket(Generic[ItemT]):
    """Queue of one (model, bucket, lane)'s waiting sequences. Not thread-safe: one owner.

    The oldest sequence always goes into the next batch (latency stays fair and bounded);
    its batch mates are the waiting sequences nearest to it in length, not the next ones in
    arrival order: a bucket spans a range of lengths, and mixing its shortest and longest
    pads the short ones (padding efficiency 0.90 -> 0.9x in the CPU benchmark).
    """

    def __init__(self) -> None:
        self._items: deque[ItemT] = deque()
        self._forget()

    @property
    def items(self) -> deque[ItemT]:
        """The waiting sequences, oldest first. Replace the deque (a setter) rather than
        remove from it in place: :meth:`is_full` and :meth:`flush_at` keep what they found."""
        return self._items

    @items.setter
    def items(self, items: deque[ItemT]) -> None:
        self._items = items
        self._forget()

    def _forget(self) -> None:
        # What is_full and flush_at worked out over the items so far, in arrival order. They
        # run at every scheduling pass, i.e. every submission: over the whole bucket each time,
        # a 256-sequence batch cost ~19 ms of event loop to form. Items appended since only
        # extend it; any removal starts over.
        self._full_policy: BatchPolicy | None = None
        self._full_seen = 0  # items is_full has looked at
        self._full_longest = 0
        self._full = False
        self._half_seen = 0  # items flush_at has looked at
        self._half_soonest = math.inf  # their earliest half-way point to the deadline

    def _new_items(self, seen: int) -> list[ItemT]:
        """The items after the first ``seen``, in arrival order (the newest end of the deque:
        a middle index of a deque is not O(1))."""
        new = list(islice(reversed(self._items), len(self._items) - seen))
        new.reverse()
        return new

    def __len__(self) -> int:
        return len(self.items)

    def add(self, item: ItemT) -> None:
        self.items.append(item)

    def oldest_wait(self, now: float) -> float:
        return now - self.items[0].enqueued_at if self.items else 0.0

    def is_full(self, policy: BatchPolicy) -> bool:
        """True when the waiting sequences, in arrival order, already fill a batch (its size
        or token budget), so waiting longer is not worth it. An estimate: :meth:`take` picks
        batch mates by nearest length, so it may take fewer than these (lengths [2, 30, 30]
        under a 64-token budget: full, and [2, 30] is taken)."""
        if policy is not self._full_policy:
            self._full_policy, self._full_seen, self._full_longest = policy, 0, 0
            self._full = False
        if self._full or self._full_seen == len(self._items):
            return self._full
        longest = self._full_longest
        for n, item in enumerate(self._new_items(self._full_seen), start=self._full_seen + 1):
            longest = max(longest, item.length)
            if n >= policy.max_batch_size or n * longest >= policy.max_batch_tokens:
                self._full = True
                break
        self._full_seen, self._full_longest = len(self._items), longest
        return self._full

    def flush_at(self, policy: BatchPolicy) -> float:
        """When waiting for company ends (on the items' clock): the oldest sequence's max
        wait, or sooner, half-way from a sequence's queueing to its deadline. A client's short
        X-Deadline-Ms (500 ms under a 2 s max wait with NLPSERVE_WAIT_WHEN_IDLE) held its
        sequence past the deadline, and the request got 504 without ever running."""
        soonest = self._half_soonest
        for it in self._new_items(self._half_seen):
            soonest = min(soonest, it.enqueued_at + (it.deadline - it.enqueued_at) / 2)
        self._half_seen, self._half_soonest = len(self._items), soonest
        return min(self._items[0].enqueued_at + policy.max_wait_s, soonest)

    def ready(self, policy: BatchPolicy, now: float | None = None) -> bool:
        if not self.items:
            return False
        now = time.monotonic() if now is None else now
        return self.is_full(policy) or now >= self.flush_at(policy)

    def time_to_ready(self, policy: BatchPolicy, now: float | None = None) -> float | None:
        """Seconds until the max-wait rule fires (0 if ready now, None if empty)."""
        if not self.items:
            return None
        now = time.monotonic() if now is None else now
        if self.is_full(policy):
            return 0.0
        return max(0.0, self.flush_at(policy) - now)

    def drop_expired(self, now: float | None = None) -> list[ItemT]:
        """Remove and return sequences whose deadline has passed (they must not run)."""
        now = time.monotonic() if now is None else now
        expired = [it for it in self.items if it.expired(now)]
        if expired:
            self.items = deque(it for it in self.items if not it.expired(now))
        return expired

    def take(self, policy: BatchPolicy) -> list[ItemT]:
        """Pop the next batch: the oldest sequence, then those nearest to it in length (ties:
        the older first) among the next ``LOOKAHEAD_BATCHES x max_batch_size``, within
        max_batch_size, the padded-token budget and the padding-efficiency floor.

        Always takes at least one sequence, so a sequence longer than the budget alone
        still runs (by itself).
        """
        if not self.items:
            return []
        window = [self.items.popleft()]
        limit = LOOKAHEAD_BATCHES * policy.max_batch_size
        while self.items and len(window) < limit:
            window.append(self.items.popleft())
        anchor = window[0]
        order = sorted(
            range(1, len(window)), key=lambda i: (abs(window[i].length - anchor.length), i)
        )
        chosen = [0]
        longest = real = anchor.length
        for i in order:
            if len(chosen) >= policy.max_batch_size:
                break
            length = window[i].length
            new_longest = max(longest, length)
            padded = (len(chosen) + 1) * new_longest
            if padded > policy.max_batch_tokens:
                continue  # too long for the budget; a shorter one may still fit
            if real + length < policy.min_padding_efficiency * padded:
                continue  # too unlike the batch; it waits for a batch of its own length
            chosen.append(i)
            longest = new_longest
            real += length
        taken = set(chosen)
        # The rest go back in front, in their arrival order.
        self.items.extendleft(reversed([it for i, it in enumerate(window) if i not in taken]))
        self._forget()
        return [window[i] for i in sorted(chosen)]


def sorted_batches(items: Iterable[ItemT], max_size: int, max_tokens: int) -> list[list[ItemT]]:
    """Greedy batches over length-sorted items under the service's two limits (at most
    ``max_size`` sequences, ``rows x longest`` at most ``max_tokens``; a longer sequence runs
    alone): for work that is all there at once (``nlpserve predict``, bench/raw_ort.py), where
    sorting beats :class:`PendingBucket`'s nearest-length choice."""
    out: list[list[ItemT]] = []
    cur: list[ItemT] = []
    for it in sorted(items, key=lambda x: x.length):
        # Sorted ascending, so the newcomer is the longest: padded = (n + 1) * its length.
        if cur and (len(cur) >= max_size or (len(cur) + 1) * it.length > max_tokens):
            out.append(cur)
            cur = []
        cur.append(it)
    if cur:
        out.append(cur)
    return out

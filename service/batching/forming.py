"""Forming batches from one bucket's pending sequences."""

from __future__ import annotations

import time
from collections import deque

from service.batching.types import BatchPolicy, WorkItem


class PendingBucket:
    """FIFO of one (model, bucket, lane)'s waiting sequences. Not thread-safe: one owner.

    FIFO keeps latency fair; length sorting is unnecessary because a bucket already spans a
    narrow range of lengths, which is what keeps padding low.
    """

    def __init__(self) -> None:
        self.items: deque[WorkItem] = deque()

    def __len__(self) -> int:
        return len(self.items)

    def add(self, item: WorkItem) -> None:
        self.items.append(item)

    def oldest_wait(self, now: float) -> float:
        return now - self.items[0].enqueued_at if self.items else 0.0

    def is_full(self, policy: BatchPolicy) -> bool:
        """True when waiting longer cannot make the next batch any bigger."""
        longest = 0
        for n, item in enumerate(self.items, start=1):
            longest = max(longest, item.length)
            if n >= policy.max_batch_size or n * longest >= policy.max_batch_tokens:
                return True
        return False

    def ready(self, policy: BatchPolicy, now: float | None = None) -> bool:
        if not self.items:
            return False
        now = time.time() if now is None else now
        return self.is_full(policy) or self.oldest_wait(now) >= policy.max_wait_s

    def time_to_ready(self, policy: BatchPolicy, now: float | None = None) -> float | None:
        """Seconds until the max-wait rule fires (0 if ready now, None if empty)."""
        if not self.items:
            return None
        now = time.time() if now is None else now
        if self.is_full(policy):
            return 0.0
        return max(0.0, policy.max_wait_s - self.oldest_wait(now))

    def drop_expired(self, now: float | None = None) -> list[WorkItem]:
        """Remove and return sequences whose deadline has passed (they must not run)."""
        now = time.time() if now is None else now
        expired = [it for it in self.items if it.expired(now)]
        if expired:
            self.items = deque(it for it in self.items if not it.expired(now))
        return expired

    def take(self, policy: BatchPolicy) -> list[WorkItem]:
        """Pop the next batch: FIFO, within max_batch_size and the padded-token budget.

        Always takes at least one sequence, so a sequence longer than the budget alone
        still runs (by itself).
        """
        batch: list[WorkItem] = []
        longest = 0
        while self.items and len(batch) < policy.max_batch_size:
            nxt = self.items[0]
            new_longest = max(longest, nxt.length)
            if batch and (len(batch) + 1) * new_longest > policy.max_batch_tokens:
                break
            batch.append(self.items.popleft())
            longest = new_longest
        return batch
